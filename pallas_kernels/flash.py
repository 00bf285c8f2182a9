"""Flash attention (forward and backward) as portable Pallas kernels.

Layout: query [B, T, N, H], key/value [B, S, K, H|Hv] with N % K == 0 (GQA).

Forward (grid (B, N, T/block_q)): each program holds one query tile and runs
an online softmax over the key tiles it can see (running max `m`, normalizer
`l`, float32 accumulator), writing the output tile and the log-sum-exp.

Backward (`jax.custom_vjp`), two kernels that never need atomics:
  dK/dV  grid (B, N, S/block_kv_bwd): a key tile loops over the query tiles
         that can see it, recomputing p = exp((s - m) - log l) from the
         forward's row max m and normalizer l (kept apart: m + log l
         rounds log l away when |m| ~ 1e38).
  dQ     grid (B, N, T/block_q_bwd): a query tile loops over its key tiles;
         also writes dS when a bias needs a gradient.
dK/dV come out per query head and are summed over each GQA group outside.

Which key tiles a query tile visits comes either from arithmetic on the
causal / local-window band (dense mode: tiles outside the band are never
loaded) or from a per-tile index table (block-sparse mode, see
`block_sparse.py`). Inside a visited tile, the element mask combines the key
tail (lengths not divisible by the tile), causal/window band, segment ids, an
optional boolean mask and an optional additive bias.

Only grid + BlockSpecs + ref indexing + `lax.fori_loop` are used, so the same
kernels lower with Mosaic (TPU), on GPU, and run anywhere with
`interpret=True` (the default on CPU). On GPU the kernels read [B, T, N, H]
directly (head dim squeezed by the BlockSpec); elsewhere the wrapper moves
heads in front ([B, N, T, H]) so that each tile's last two dims are
(sequence, head_dim), as Mosaic wants.

Softmax statistics are float32 whatever the input dtype; outputs are in the
query dtype; a query row with nothing to attend to gives zeros (lse = -inf).

Internal entry points, for the other kernels of this package (block_sparse,
neighborhood), not for users:

  FlashConfig   the kernels' static configuration (scale, band, tiles,
                layout, platform, GQA groups, optional neighbourhood mode).
  flash_core    the differentiable kernel call on padded arrays for a
                FlashConfig (custom_vjp: forward kernel, dQ and dK/dV
                kernels); returns (out, lse with the finite sentinel).
  flash_entry   validation + padding + masked-slot zeroing + flash_core,
                from user-layout arrays; `flash_attention` and
                `block_sparse_attention` are thin fronts over it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._rules import (KV_PAD_SEGMENT, MASK_VALUE, Q_PAD_SEGMENT,
                                   cdiv, check_qkv, check_segment_ids,
                                   default_scale, normalize_window, round_up)
from pallas_kernels._util import (check_float, compiler_params, lcm,
                                  next_pow2, resolve_interpret,
                                  target_platform)

# Finite "minus infinity" for masked logits and the running max's start: the
# lowest finite float32, so it never beats a real logit (rows whose logits
# all lie below -1e30 are still their softmax) and exp/max stay free of
# inf - inf. Empty rows are found by l == 0, never by comparing with it.
_NEG = MASK_VALUE


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes. Forward: block_q x block_kv; backward: *_bwd for both kernels.

  Sizes larger than the (power-of-two rounded) sequence are clipped; lengths
  that are not multiples are padded and the tail is masked.
  """
  block_q: int = 128
  block_kv: int = 128
  block_q_bwd: int = 128
  block_kv_bwd: int = 128

  def __post_init__(self):
    for f in dataclasses.fields(self):
      v = getattr(self, f.name)
      if not isinstance(v, int) or v <= 0:
        raise ValueError(f"BlockSizes.{f.name} must be a positive int, got {v!r}.")

  @classmethod
  def get_default(cls, platform: Optional[str] = None, head_dim: int = 128,
                  dtype=None) -> "BlockSizes":
    """Per-platform defaults (starting points, tune with bench_kernels).

    GPU sizes are chosen so that every kernel (fwd, dQ, dK/dV) fits the
    shared memory of an A100 (163 KiB per block) as well as an H100, as
    compiled by Triton for sm_80/sm_90 (experiments/kernel_aot_report.py);
    4-byte dtypes get smaller tiles.
    """
    platform = platform or target_platform()
    wide = dtype is not None and jnp.dtype(dtype).itemsize >= 4
    if platform == "tpu":
      return cls(block_q=512, block_kv=512, block_q_bwd=256, block_kv_bwd=256)
    if platform == "gpu":
      if head_dim > 128:
        if wide:
          return cls(block_q=32, block_kv=32, block_q_bwd=16, block_kv_bwd=32)
        return cls(block_q=64, block_kv=32, block_q_bwd=32, block_kv_bwd=32)
      if head_dim > 64 and wide:
        return cls(block_q=64, block_kv=64, block_q_bwd=32, block_kv_bwd=64)
      return cls(block_q=128, block_kv=64, block_q_bwd=64, block_kv_bwd=64)
    # CPU interpret mode: big tiles mean few interpreted loop steps.
    return cls(block_q=128, block_kv=128, block_q_bwd=128, block_kv_bwd=128)


@dataclasses.dataclass(frozen=True)
class FlashConfig:
  """Static configuration of one flash kernel call (see `flash_core`)."""
  scale: float
  left: float          # query i sees keys >= i - left (inf: unbounded)
  right: float         # query i sees keys <= i + right (inf: unbounded)
  kv_len: int          # true key length (keys at/after it are padding)
  bq: int
  bk: int
  bq_bwd: int
  bk_bwd: int
  interpret: bool
  platform: str        # target platform: 'cpu' | 'gpu' | 'tpu'
  heads_major: bool    # arrays are [B, N, L, H] (else [B, L, N, H])
  groups: int          # query heads per kv head
  # Fused neighborhood attention: None, or a NeighborhoodTiling
  # (pallas_kernels/neighborhood.py), whose methods give the in-tile mask and
  # the tiles a tile visits (group_lengths, valid, bounds).
  na: Optional[object] = None


# ----------------------------------------------------------------------------
# In-kernel helpers
# ----------------------------------------------------------------------------

def _tile2d(ref, rows, cols):
  """Loads a 2D tile; `rows`/`cols` are pl.ds or None (whole / broadcast)."""
  r = slice(None) if rows is None or ref.shape[0] == 1 else rows
  c = slice(None) if cols is None or ref.shape[1] == 1 else cols
  return ref[r, c]


def _dot_nt(a, b):
  """a [m, d] @ b[n, d]^T -> [m, n] float32."""
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                         preferred_element_type=jnp.float32)


def _dot_tn(a, b):
  """a[m, n]^T @ b[m, d] -> [n, d] float32."""
  return lax.dot_general(a, b, (((0,), (0,)), ((), ())),
                         preferred_element_type=jnp.float32)


def _dot_nn(a, b):
  return lax.dot_general(a, b, (((1,), (0,)), ((), ())),
                         preferred_element_type=jnp.float32)


def _scores(cfg, q, k, q_start, k_start, bias_t, mask_t, qseg_t, kvseg_t,
            s_pad, na_n=None):
  """Scaled (biased) logits [bq, bk] float32 and validity mask (or None)."""
  s = _dot_nt(q, k) * cfg.scale
  if bias_t is not None:
    s = s + bias_t.astype(jnp.float32)
  shape = s.shape
  parts = []
  if cfg.na is not None:
    parts.append(_na_valid(cfg, shape, q_start, k_start, na_n))
  need_pos = (cfg.kv_len < s_pad or math.isfinite(cfg.left)
              or math.isfinite(cfg.right))
  if need_pos:
    qpos = lax.broadcasted_iota(jnp.int32, shape, 0) + q_start
    kpos = lax.broadcasted_iota(jnp.int32, shape, 1) + k_start
    if cfg.kv_len < s_pad:
      parts.append(kpos < cfg.kv_len)
    if math.isfinite(cfg.left):
      parts.append(kpos >= qpos - int(cfg.left))
    if math.isfinite(cfg.right):
      parts.append(kpos <= qpos + int(cfg.right))
  if mask_t is not None:
    parts.append(mask_t != 0)
  if qseg_t is not None:
    parts.append(qseg_t == kvseg_t)
  valid = None
  for p in parts:
    valid = p if valid is None else jnp.logical_and(valid, p)
  if valid is not None:
    valid = jnp.broadcast_to(valid, shape)
    s = jnp.where(valid, s, _NEG)
  return s, valid


def _select_i32(pred, a, b):
  """Scalar int32 select. (jnp.where with Python-int branches lowers to an
  i1 select in the Pallas Triton lowering, which then fails verification
  when used as a loop bound: found by compiling the lowered TTIR.)"""
  return lax.select(pred, jnp.asarray(a, jnp.int32), jnp.asarray(b, jnp.int32))


def _na_group_lengths(cfg):
  """In-group lengths of this program's dilation group (neighborhood mode;
  the rule lives in `cfg.na`, a pallas_kernels.neighborhood.NeighborhoodTiling)."""
  return cfg.na.group_lengths(pl.program_id(0))


def _na_valid(cfg, shape, q_start, k_start, na_n):
  """Neighborhood mask of a (query tile, key tile) pair."""
  return cfg.na.valid(shape, q_start, k_start, na_n)


def _na_bounds(cfg, tile, inverse, na_n):
  """(0, count, j_of_t) over the key tiles a query tile can see (or, when
  `inverse`, the query tiles that can see a key tile)."""
  return cfg.na.bounds(tile, inverse, na_n)


def _table_head(cnt_ref):
  """(batch, head) row of the block-sparse tables [Bl, Nl, ...] for this
  program (0 along an axis the layout shares)."""
  return (pl.program_id(0) if cnt_ref.shape[0] != 1 else 0,
          pl.program_id(1) if cnt_ref.shape[1] != 1 else 0)


def _kv_loop_bounds(cfg, i, bq, bk, nk_valid, cnt_ref, idx_ref, na_n=None):
  """(lo, hi, j_of_t) for the key tiles query tile i visits."""
  if cfg.na is not None:
    return _na_bounds(cfg, i, False, na_n)
  if cnt_ref is not None:
    bs, hs = _table_head(cnt_ref)
    return 0, cnt_ref[bs, hs, i], lambda t: idx_ref[bs, hs, i, t]
  lo = 0
  hi = nk_valid
  if math.isfinite(cfg.left):
    lo = jnp.maximum(0, (i * bq - int(cfg.left)) // bk)
  if math.isfinite(cfg.right):
    hi = jnp.minimum(nk_valid, (i * bq + bq - 1 + int(cfg.right)) // bk + 1)
  return lo, hi, lambda t: t


def _q_loop_bounds(cfg, j, bq, bk, nq, nk_valid, cnt_ref, idx_ref,
                   na_n=None):
  """(lo, hi, i_of_t) for the query tiles that see key tile j."""
  if cfg.na is not None:
    return _na_bounds(cfg, j, True, na_n)
  if cnt_ref is not None:
    bs, hs = _table_head(cnt_ref)
    return 0, cnt_ref[bs, hs, j], lambda t: idx_ref[bs, hs, j, t]
  lo = 0
  hi = nq
  if math.isfinite(cfg.right):
    lo = jnp.maximum(0, (j * bk - int(cfg.right)) // bq)
  if math.isfinite(cfg.left):
    hi = jnp.minimum(nq, (j * bk + bk - 1 + int(cfg.left)) // bq + 1)
  hi = _select_i32(j < nk_valid, hi, lo)   # all-padding key tile
  return lo, hi, lambda t: t


def _unpack(refs, flags):
  it = iter(refs)
  out = {}
  for name in ("q", "k", "v"):
    out[name] = next(it)
  for name in flags:
    out[name] = next(it)
  out["rest"] = list(it)
  return out


# ----------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------

def _fwd_kernel(*refs, cfg, flags, s_pad):
  r = _unpack(refs, flags)
  o_ref, m_ref, l_ref = r["rest"]
  bias_ref, mask_ref = r.get("bias"), r.get("mask")
  qseg_ref, kvseg_ref = r.get("qseg"), r.get("kvseg")
  bq, bk = cfg.bq, cfg.bk
  i = pl.program_id(2)
  q = r["q"][...]
  qseg_t = None if qseg_ref is None else qseg_ref[...]
  hv = r["v"].shape[-1]
  nk_valid = cdiv(cfg.kv_len, bk)
  # program_id is read here, not inside loop bodies (interpret mode).
  na_n = None if cfg.na is None else _na_group_lengths(cfg)
  lo, hi, jfn = _kv_loop_bounds(cfg, i, bq, bk, nk_valid, r.get("kcnt"),
                                r.get("kidx"), na_n)

  def body(t, carry):
    acc, m, l = carry
    j = jfn(t)
    start = j * bk
    sl = pl.ds(start, bk)
    k = r["k"][sl, :]
    v = r["v"][sl, :]
    s, valid = _scores(
        cfg, q, k, i * bq, start,
        None if bias_ref is None else _tile2d(bias_ref, None, sl),
        None if mask_ref is None else _tile2d(mask_ref, None, sl),
        qseg_t, None if kvseg_ref is None else _tile2d(kvseg_ref, None, sl),
        s_pad, na_n)
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    p = jnp.exp(s - m_new)
    if valid is not None:
      p = jnp.where(valid, p, 0.0)
    alpha = jnp.exp(m - m_new)
    l = alpha * l + jnp.sum(p, axis=1, keepdims=True)
    acc = alpha * acc + _dot_nn(p.astype(v.dtype), v)
    return acc, m_new, l

  init = (jnp.zeros((bq, hv), jnp.float32),
          jnp.full((bq, 1), _NEG, jnp.float32),
          jnp.zeros((bq, 1), jnp.float32))
  acc, m, l = lax.fori_loop(lo, hi, body, init)
  l_safe = jnp.where(l > 0.0, l, 1.0)
  o_ref[...] = (acc / l_safe).astype(o_ref.dtype)
  # The row statistics m and l, not lse = m + log(l): at |m| ~ 1e38 the
  # log(l) rounds away and the backward's p would be l times too large.
  # l == 0 marks a row with nothing to attend to (see `_row_stats`).
  m_ref[...] = m
  l_ref[...] = l


def _dq_kernel(*refs, cfg, flags, s_pad):
  r = _unpack(refs, flags)
  rest = r["rest"]
  do_ref, m_ref, logl_ref, delta_ref = rest[:4]
  dq_ref = rest[4]
  dbias_ref = rest[5] if len(rest) > 5 else None
  bias_ref, mask_ref = r.get("bias"), r.get("mask")
  qseg_ref, kvseg_ref = r.get("qseg"), r.get("kvseg")
  bq, bk = cfg.bq_bwd, cfg.bk_bwd
  i = pl.program_id(2)
  q = r["q"][...]
  do = do_ref[...]
  m = m_ref[...]
  logl = logl_ref[...]
  delta = delta_ref[...]
  qseg_t = None if qseg_ref is None else qseg_ref[...]
  nk_valid = cdiv(cfg.kv_len, bk)
  # program_id is read here, not inside loop bodies (interpret mode).
  na_n = None if cfg.na is None else _na_group_lengths(cfg)
  lo, hi, jfn = _kv_loop_bounds(cfg, i, bq, bk, nk_valid, r.get("kcnt"),
                                r.get("kidx"), na_n)
  if dbias_ref is not None:
    # Tiles the loop below skips must read zero. Zeroed tile by tile: the
    # Triton lowering only takes power-of-two arrays, and s_pad need not be.
    def zero(jj, c):
      dbias_ref[:, pl.ds(jj * bk, bk)] = jnp.zeros((bq, bk), dbias_ref.dtype)
      return c
    lax.fori_loop(0, s_pad // bk, zero, 0)

  def body(t, dq):
    j = jfn(t)
    start = j * bk
    sl = pl.ds(start, bk)
    k = r["k"][sl, :]
    v = r["v"][sl, :]
    s, valid = _scores(
        cfg, q, k, i * bq, start,
        None if bias_ref is None else _tile2d(bias_ref, None, sl),
        None if mask_ref is None else _tile2d(mask_ref, None, sl),
        qseg_t, None if kvseg_ref is None else _tile2d(kvseg_ref, None, sl),
        s_pad, na_n)
    p = jnp.exp((s - m) - logl)   # exp(s - lse), exact for huge |m|
    if valid is not None:
      p = jnp.where(valid, p, 0.0)
    dp = _dot_nt(do, v)
    ds = p * (dp - delta)
    if dbias_ref is not None:
      dbias_ref[:, sl] = ds.astype(dbias_ref.dtype)
    return dq + _dot_nn(ds.astype(k.dtype), k)

  dq = lax.fori_loop(lo, hi, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, cfg, flags, s_pad, nq):
  r = _unpack(refs, flags)
  rest = r["rest"]
  do_ref, m_ref, logl_ref, delta_ref, dk_ref, dv_ref = rest
  bias_ref, mask_ref = r.get("bias"), r.get("mask")
  qseg_ref, kvseg_ref = r.get("qseg"), r.get("kvseg")
  bq, bk = cfg.bq_bwd, cfg.bk_bwd
  j = pl.program_id(2)
  k = r["k"][...]
  v = r["v"][...]
  kvseg_t = None if kvseg_ref is None else kvseg_ref[...]
  nk_valid = cdiv(cfg.kv_len, bk)
  na_n = None if cfg.na is None else _na_group_lengths(cfg)
  lo, hi, ifn = _q_loop_bounds(cfg, j, bq, bk, nq, nk_valid, r.get("qcnt"),
                               r.get("qidx"), na_n)

  def body(t, carry):
    dk, dv = carry
    i = ifn(t)
    start = i * bq
    sl = pl.ds(start, bq)
    q = r["q"][sl, :]
    do = do_ref[sl, :]
    m = m_ref[sl, :]
    logl = logl_ref[sl, :]
    delta = delta_ref[sl, :]
    s, valid = _scores(
        cfg, q, k, start, j * bk,
        None if bias_ref is None else _tile2d(bias_ref, sl, None),
        None if mask_ref is None else _tile2d(mask_ref, sl, None),
        None if qseg_ref is None else _tile2d(qseg_ref, sl, None), kvseg_t,
        s_pad, na_n)
    p = jnp.exp((s - m) - logl)   # exp(s - lse), exact for huge |m|
    if valid is not None:
      p = jnp.where(valid, p, 0.0)
    dv = dv + _dot_tn(p.astype(do.dtype), do)
    dp = _dot_nt(do, v)
    ds = p * (dp - delta)
    dk = dk + _dot_tn(ds.astype(q.dtype), q)
    return dk, dv

  dk, dv = lax.fori_loop(lo, hi, body,
                         (jnp.zeros(k.shape, jnp.float32),
                          jnp.zeros(v.shape, jnp.float32)))
  dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


# ----------------------------------------------------------------------------
# BlockSpecs
# ----------------------------------------------------------------------------

def _seq_spec(cfg, block_len, width, head_of, blk_of):
  """Spec for a [B, L, N, W] (or heads-major [B, N, L, W]) array; grid (b, n, x)."""
  if cfg.heads_major:
    return pl.BlockSpec((None, None, block_len, width),
                        lambda b, n, x: (b, head_of(n), blk_of(x), 0))
  return pl.BlockSpec((None, block_len, None, width),
                      lambda b, n, x: (b, blk_of(x), head_of(n), 0))


def _bn_spec(arr, rows, cols, row_of, col_of):
  """Spec for a [Bx, Nx, Rx, Cx] array whose dims may be 1 (broadcast)."""
  bb, nb, rb, cb = arr.shape
  rblk = rows if rb != 1 else 1
  cblk = cols if cb != 1 else 1
  return pl.BlockSpec(
      (None, None, rblk, cblk),
      lambda b, n, x: (b if bb != 1 else 0, n if nb != 1 else 0,
                       row_of(x) if rb != 1 else 0,
                       col_of(x) if cb != 1 else 0))


def _inputs(cfg, q, k, v, extras, *, mode):
  """(flags, arrays, in_specs) for the q/k/v + optional extras of a kernel.

  mode 'q': grid over query tiles (fwd, dq); 'kv': grid over key tiles (dkv).
  """
  g = cfg.groups
  tp = q.shape[2] if cfg.heads_major else q.shape[1]
  sp = k.shape[2] if cfg.heads_major else k.shape[1]
  h, hv = q.shape[-1], v.shape[-1]
  if mode == "q":
    bq = cfg.bq if mode == "q" and extras.get("_fwd") else cfg.bq_bwd
    q_spec = _seq_spec(cfg, bq, h, lambda n: n, lambda x: x)
    k_spec = _seq_spec(cfg, sp, h, lambda n: n // g, lambda x: 0)
    v_spec = _seq_spec(cfg, sp, hv, lambda n: n // g, lambda x: 0)
    rows, cols, row_of, col_of = bq, sp, (lambda x: x), (lambda x: 0)
  else:
    bk = cfg.bk_bwd
    q_spec = _seq_spec(cfg, tp, h, lambda n: n, lambda x: 0)
    k_spec = _seq_spec(cfg, bk, h, lambda n: n // g, lambda x: x)
    v_spec = _seq_spec(cfg, bk, hv, lambda n: n // g, lambda x: x)
    rows, cols, row_of, col_of = tp, bk, (lambda x: 0), (lambda x: x)
  flags, arrays, specs = [], [q, k, v], [q_spec, k_spec, v_spec]
  for name in ("bias", "mask"):
    a = extras.get(name)
    if a is not None:
      flags.append(name)
      arrays.append(a)
      specs.append(_bn_spec(a, rows, cols, row_of, col_of))
  if extras.get("qseg") is not None:
    qs, ks = extras["qseg"], extras["kvseg"]   # [B, Tp, 1], [B, 1, Sp]
    flags += ["qseg", "kvseg"]
    arrays += [qs, ks]
    if mode == "q":
      specs += [pl.BlockSpec((None, rows, 1), lambda b, n, x: (b, x, 0)),
                pl.BlockSpec((None, 1, sp), lambda b, n, x: (b, 0, 0))]
    else:
      specs += [pl.BlockSpec((None, tp, 1), lambda b, n, x: (b, 0, 0)),
                pl.BlockSpec((None, 1, cols), lambda b, n, x: (b, 0, x))]
  tables = extras.get("kv_tables" if mode == "q" else "q_tables")
  if tables is not None:
    cnt, idx = tables     # [Bl, Nl, n_tiles], [Bl, Nl, n_tiles, n_other]
    flags += ["kcnt", "kidx"] if mode == "q" else ["qcnt", "qidx"]
    arrays += [cnt, idx]
    # Whole tables, read as scalars in the loop bounds; on TPU they must
    # live in SMEM (scalar memory), elsewhere the default memory is fine.
    specs += [_scalar_table_spec(cfg)] * 2
  return tuple(flags), arrays, specs


def _scalar_table_spec(cfg):
  if cfg.platform == "tpu" and not cfg.interpret:
    return pl.BlockSpec(memory_space=pltpu.SMEM)
  return pl.BlockSpec(memory_space=None)


def _compiler_params(cfg, bq, bk):
  """`_util.compiler_params` for the (b, n, tile) grid; on GPU 4 warps for
  tiles up to 64x64 elements, else 8."""
  return compiler_params(cfg.platform, cfg.interpret, grid_rank=3,
                         num_warps=4 if bq * bk <= 64 * 64 else 8)


def _stat_spec(cfg, rows, mode_q: bool, tp):
  """Spec for [B, N, Tp, 1] row statistics (lse, delta)."""
  if mode_q:
    return pl.BlockSpec((None, None, rows, 1), lambda b, n, x: (b, n, x, 0))
  return pl.BlockSpec((None, None, tp, 1), lambda b, n, x: (b, n, 0, 0))


def _dims(cfg, q, k):
  if cfg.heads_major:
    b, n, tp, _ = q.shape
    sp = k.shape[2]
  else:
    b, tp, n, _ = q.shape
    sp = k.shape[1]
  return b, n, tp, sp


# ----------------------------------------------------------------------------
# pallas_call wrappers and custom_vjp
# ----------------------------------------------------------------------------

def _fwd_call(cfg, q, k, v, extras):
  b, n, tp, sp = _dims(cfg, q, k)
  hv = v.shape[-1]
  flags, arrays, specs = _inputs(cfg, q, k, v, dict(extras, _fwd=True),
                                 mode="q")
  out_shape = [
      jax.ShapeDtypeStruct(q.shape[:-1] + (hv,), q.dtype),
      jax.ShapeDtypeStruct((b, n, tp, 1), jnp.float32),
      jax.ShapeDtypeStruct((b, n, tp, 1), jnp.float32)]
  out_specs = [_seq_spec(cfg, cfg.bq, hv, lambda n_: n_, lambda x: x),
               _stat_spec(cfg, cfg.bq, True, tp),
               _stat_spec(cfg, cfg.bq, True, tp)]
  kernel = functools.partial(_fwd_kernel, cfg=cfg, flags=flags, s_pad=sp)
  out, m, l = pl.pallas_call(
      kernel, out_shape=out_shape, grid=(b, n, tp // cfg.bq),
      in_specs=specs, out_specs=out_specs, interpret=cfg.interpret,
      compiler_params=_compiler_params(cfg, cfg.bq, cfg.bk),
      name="flash_fwd")(*arrays)
  return out, m, l


def _bwd_call(cfg, q, k, v, extras, out, m, logl, dout, dlse):
  b, n, tp, sp = _dims(cfg, q, k)
  h, hv = q.shape[-1], v.shape[-1]
  g = cfg.groups
  # delta_i = rowsum(dO * O) - dlse_i  (dlse folds into the same term).
  # As a contraction (like the in-kernel dO V^T) so that rows whose
  # probabilities are exactly one give dS exactly zero.
  if cfg.heads_major:
    delta = jnp.einsum("bntd,bntd->bnt", dout.astype(jnp.float32),
                       out.astype(jnp.float32))[..., None]
  else:
    delta = jnp.einsum("btnd,btnd->bnt", dout.astype(jnp.float32),
                       out.astype(jnp.float32))[..., None]
  if dlse is not None:
    delta = delta - dlse.astype(jnp.float32)
  has_bias = extras.get("bias") is not None

  # dQ (+ dS for the bias).
  flags, arrays, specs = _inputs(cfg, q, k, v, extras, mode="q")
  bq = cfg.bq_bwd
  arrays += [dout, m, logl, delta]
  specs += [_seq_spec(cfg, bq, hv, lambda n_: n_, lambda x: x)] + [
      _stat_spec(cfg, bq, True, tp)] * 3
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
  out_specs = [_seq_spec(cfg, bq, h, lambda n_: n_, lambda x: x)]
  if has_bias:
    out_shape.append(jax.ShapeDtypeStruct((b, n, tp, sp), jnp.float32))
    out_specs.append(pl.BlockSpec((None, None, bq, sp),
                                  lambda b_, n_, x: (b_, n_, x, 0)))
  kernel = functools.partial(_dq_kernel, cfg=cfg, flags=flags, s_pad=sp)
  res = pl.pallas_call(
      kernel, out_shape=out_shape, grid=(b, n, tp // bq), in_specs=specs,
      out_specs=out_specs, interpret=cfg.interpret,
      compiler_params=_compiler_params(cfg, bq, cfg.bk_bwd),
      name="flash_dq")(*arrays)
  dq = res[0]
  dbias_full = res[1] if has_bias else None

  # dK, dV per query head.
  flags, arrays, specs = _inputs(cfg, q, k, v, extras, mode="kv")
  bk = cfg.bk_bwd
  arrays += [dout, m, logl, delta]
  specs += [_seq_spec(cfg, tp, hv, lambda n_: n_, lambda x: 0)] + [
      _stat_spec(cfg, tp, False, tp)] * 3
  if cfg.heads_major:
    dk_shape, dv_shape = (b, n, sp, h), (b, n, sp, hv)
  else:
    dk_shape, dv_shape = (b, sp, n, h), (b, sp, n, hv)
  out_shape = [jax.ShapeDtypeStruct(dk_shape, jnp.float32),
               jax.ShapeDtypeStruct(dv_shape, jnp.float32)]
  out_specs = [_seq_spec(cfg, bk, h, lambda n_: n_, lambda x: x),
               _seq_spec(cfg, bk, hv, lambda n_: n_, lambda x: x)]
  kernel = functools.partial(_dkv_kernel, cfg=cfg, flags=flags, s_pad=sp,
                             nq=tp // cfg.bq_bwd)
  dk, dv = pl.pallas_call(
      kernel, out_shape=out_shape, grid=(b, n, sp // bk), in_specs=specs,
      out_specs=out_specs, interpret=cfg.interpret,
      compiler_params=_compiler_params(cfg, cfg.bq_bwd, bk),
      name="flash_dkv")(*arrays)
  nkv = n // g
  if cfg.heads_major:
    dk = dk.reshape(b, nkv, g, sp, h).sum(2)
    dv = dv.reshape(b, nkv, g, sp, hv).sum(2)
  else:
    dk = dk.reshape(b, sp, nkv, g, h).sum(3)
    dv = dv.reshape(b, sp, nkv, g, hv).sum(3)
  dbias = None
  if has_bias:
    bias = extras["bias"]
    axes = tuple(a for a in range(4) if bias.shape[a] == 1 and
                 dbias_full.shape[a] != 1)
    dbias = jnp.sum(dbias_full, axis=axes, keepdims=True) if axes else dbias_full
    dbias = dbias.astype(bias.dtype)
  return dq, dk.astype(k.dtype), dv.astype(v.dtype), dbias


def _pack(bias, mask, qseg, kvseg, kv_tables, q_tables):
  return {"bias": bias, "mask": mask, "qseg": qseg, "kvseg": kvseg,
          "kv_tables": kv_tables, "q_tables": q_tables}


def _row_stats(m, l):
  """(m, log l, has) from the kernel's row max and normalizer: `has` (l > 0)
  is the explicit "row has something to attend to" flag; on other rows m
  and log l are 0 (finite; their p is zeroed by the mask anyway)."""
  has = l > 0.0
  return jnp.where(has, m, 0.0), jnp.log(jnp.where(has, l, 1.0)), has


def _flash_stats(cfg, q, k, v, bias, mask, qseg, kvseg, kv_tables, q_tables):
  """(out, lse, has, m, log l); lse is MASK_VALUE where not `has`."""
  out, m, l = _fwd_call(cfg, q, k, v,
                        _pack(bias, mask, qseg, kvseg, kv_tables, q_tables))
  m, logl, has = _row_stats(m, l)
  return out, jnp.where(has, m + logl, _NEG), has, m, logl


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg, q, k, v, bias, mask, qseg, kvseg, kv_tables, q_tables):
  return _flash_stats(cfg, q, k, v, bias, mask, qseg, kvseg, kv_tables,
                      q_tables)[:3]


def _flash_fwd(cfg, q, k, v, bias, mask, qseg, kvseg, kv_tables, q_tables):
  out, lse, has, m, logl = _flash_stats(cfg, q, k, v, bias, mask, qseg, kvseg,
                                        kv_tables, q_tables)
  return (out, lse, has), (q, k, v, bias, mask, qseg, kvseg, kv_tables,
                           q_tables, out, m, logl)


def _flash_bwd(cfg, res, cts):
  q, k, v, bias, mask, qseg, kvseg, kv_tables, q_tables, out, m, logl = res
  dout, dlse, _ = cts   # `has` is boolean: no cotangent
  extras = _pack(bias, mask, qseg, kvseg, kv_tables, q_tables)
  dq, dk, dv, dbias = _bwd_call(cfg, q, k, v, extras, out, m, logl, dout,
                                dlse)
  none_like = lambda t: None if t is None else jax.tree.map(lambda _: None, t)
  return (dq, dk, dv, dbias, None, None, None, none_like(kv_tables),
          none_like(q_tables))


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_core(cfg: FlashConfig, q, k, v, *, bias=None, mask=None,
               qseg=None, kvseg=None, kv_tables=None, q_tables=None):
  """The differentiable kernel call (internal entry point, see the module
  docstring).

  q [B, Tp, N, H] / k, v [B, Sp, K, H|Hv] (or heads-major [B, N, Tp, H] when
  `cfg.heads_major`), lengths padded to multiples of the tiles; optional
  bias/mask [B|1, N|1, Tp|1, Sp|1] (mask int8), segment ids qseg
  [B, Tp, 1] / kvseg [B, 1, Sp], block-sparse tables. Returns (out, lse
  [B, N, Tp, 1] float32 with `MASK_VALUE` on rows with nothing to attend
  to; a real row can have that lse too, see `_flash` for the flag).
  Differentiable in q, k, v and bias.
  """
  return _flash(cfg, q, k, v, bias, mask, qseg, kvseg, kv_tables,
                q_tables)[:2]


# ----------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------

def _kv_live(mask, q_segment_ids, kv_segment_ids, right, t, s, n, nkv):
  """Bool [B|1, S, K|1, 1]: False at key slots no query can attend (a mask
  column False for every query of the kv head's group, a kv segment id no
  query carries, keys right of every query's causal/window reach); None if
  none is ruled out. Those slots of k and v are zeroed before the kernels,
  so whatever they hold (NaN, Inf) reaches no output and no gradient."""
  parts = []
  if mask is not None and mask.shape[3] != 1:
    mb, mn = mask.shape[0], mask.shape[1]
    col = jnp.any(mask, axis=2)
    if mn != 1 and n != nkv:
      col = jnp.any(col.reshape(mb, nkv, n // nkv, s), axis=2)
    parts.append(jnp.swapaxes(col, 1, 2)[..., None])
  if q_segment_ids is not None:
    def one(q, kv):
      qs = jnp.sort(q)
      idx = jnp.clip(jnp.searchsorted(qs, kv), 0, qs.shape[0] - 1)
      return qs[idx] == kv
    live = jax.vmap(one)(q_segment_ids, kv_segment_ids)
    parts.append(live[:, :, None, None])
  if math.isfinite(right) and t - 1 + right < s - 1:
    j = jnp.arange(s, dtype=jnp.int32)
    parts.append((j <= t - 1 + int(right)).reshape(1, s, 1, 1))
  out = None
  for p in parts:
    out = p if out is None else jnp.logical_and(out, p)
  return out


def _as4d(name, x, target):
  """Broadcast-compatible rank<=4 array -> rank 4, validating against target."""
  x = jnp.asarray(x)
  if x.ndim > 4:
    raise ValueError(f"`{name}` must have rank <= 4, got shape {x.shape}.")
  x = x.reshape((1,) * (4 - x.ndim) + x.shape)
  for s, t in zip(x.shape, target):
    if s not in (1, t):
      raise ValueError(
          f"`{name}` with shape {x.shape} is not broadcastable to "
          f"[batch, heads, q_len, kv_len]={tuple(target)}.")
  return x


def check_inputs(query, key, value):
  """Validates [B, T, N, H] / [B, S, K, H] / [B, S, K, Hv]; returns dims
  (B, T, N, S, K, H, Hv). The rule is `_rules.check_qkv`."""
  return check_qkv(query, key, value, allow_unbatched=False)


def _pad_head_dims(cfg) -> bool:
  """Head dims are padded to powers of two for the GPU (Triton) lowering."""
  return cfg.platform == "gpu" and not cfg.interpret


def flash_entry(query, key, value, *, bias, mask, is_causal, scale,
                 local_window_size, q_segment_ids, kv_segment_ids,
                 block_sizes, interpret, heads_major, tables=None,
                 tile_sizes=None, need_lse=True):
  """Internal entry point shared by flash_attention and
  block_sparse_attention (see the module docstring): validates user-layout
  arrays, pads them to the tiles, zeroes key/value slots no query can see,
  and runs `flash_core`.

  Returns (out, lse); lse is -inf on rows with nothing to attend to, or None
  when not `need_lse` (then no inf is produced anywhere).
  """
  b, t, n, s, nkv, h, hv = check_inputs(query, key, value)
  if scale is not None:
    if isinstance(scale, jax.core.Tracer) or not math.isfinite(float(scale)):
      raise ValueError(f"`scale` must be a finite number, got {scale!r}.")
  scale = default_scale(scale, h)
  window = normalize_window(local_window_size)
  if window is not None:
    # Reaches past t + s are unbounded in effect: cap them (int32-safe).
    window = (min(window[0], t + s), min(window[1], t + s))
  left, right = (math.inf, math.inf) if window is None else map(float, window)
  if is_causal:
    right = min(right, 0.0)
  if 0 in (b, t, n, s, h, hv):
    # Empty batch / sequences / heads: the result is fully determined.
    out = jnp.zeros((b, t, n, hv), query.dtype)
    lse = jnp.full((b, n, t), -jnp.inf, jnp.float32) if need_lse else None
    return out, lse
  interpret = resolve_interpret(interpret)
  if heads_major is None:
    heads_major = interpret or target_platform() != "gpu"
  if tile_sizes is not None:           # block-sparse: tiles fixed by layout
    bq = bq_b = tile_sizes[0]
    bk = bk_b = tile_sizes[1]
  else:
    if block_sizes is None:
      block_sizes = BlockSizes.get_default(head_dim=max(h, hv),
                                           dtype=query.dtype)
    if not isinstance(block_sizes, BlockSizes):
      raise ValueError(
          f"`block_sizes` must be a BlockSizes, got {type(block_sizes)}.")
    cq = max(8, next_pow2(t))
    ck = max(8, next_pow2(s))
    bq, bk = min(block_sizes.block_q, cq), min(block_sizes.block_kv, ck)
    bq_b = min(block_sizes.block_q_bwd, cq)
    bk_b = min(block_sizes.block_kv_bwd, ck)
  tp = round_up(t, lcm(bq, bq_b))
  sp = round_up(s, lcm(bk, bk_b))
  cfg = FlashConfig(scale=float(scale), left=float(left),
                    right=float(right), kv_len=s, bq=bq, bk=bk, bq_bwd=bq_b,
                    bk_bwd=bk_b, interpret=interpret,
                    platform=target_platform(),
                    heads_major=bool(heads_major), groups=n // nkv)
  target = (b, n, t, s)

  def pad_ts(x, fill):
    pads = [(0, 0), (0, 0), (0, tp - t if x.shape[2] != 1 else 0),
            (0, sp - s if x.shape[3] != 1 else 0)]
    return jnp.pad(x, pads, constant_values=fill)

  if bias is not None:
    bias = _as4d("bias", bias, target)
    check_float("bias", bias)
    bias = pad_ts(bias, 0)
  if mask is not None:
    mask = _as4d("mask", mask, target)
    if mask.dtype != jnp.bool_:
      raise ValueError(
          f"`mask` must be boolean (True = attend), got dtype {mask.dtype}.")
    mask = pad_ts(mask.astype(jnp.int8), 0)
  qseg = kvseg = None
  q_segment_ids, kv_segment_ids = check_segment_ids(
      q_segment_ids, kv_segment_ids, b, t, s)
  if q_segment_ids is not None:
    qseg = jnp.pad(q_segment_ids, ((0, 0), (0, tp - t)),
                   constant_values=Q_PAD_SEGMENT)[:, :, None]
    kvseg = jnp.pad(kv_segment_ids, ((0, 0), (0, sp - s)),
                    constant_values=KV_PAD_SEGMENT)[:, None, :]
  live = _kv_live(
      None if mask is None else mask[:, :, :t, :s] != 0,
      None if qseg is None else qseg[:, :t, 0],
      None if kvseg is None else kvseg[:, 0, :s], right, t, s, n, nkv)
  if live is not None:
    key = jnp.where(live, key, jnp.zeros((), key.dtype))
    value = jnp.where(live, value, jnp.zeros((), value.dtype))
  kv_tables, q_tables = (None, None) if tables is None else tables
  if _pad_head_dims(cfg):
    # The Triton lowering needs power-of-two (>= 16) array dims: zero-pad
    # the head dims (exact: padded q/k columns add 0 to the logits, padded v
    # columns are sliced off).
    hp, hvp = max(16, next_pow2(h)), max(16, next_pow2(hv))
    pad_h = lambda x, to: jnp.pad(
        x, ((0, 0),) * 3 + ((0, to - x.shape[-1]),))
    query, key, value = pad_h(query, hp), pad_h(key, hp), pad_h(value, hvp)
  out, lse, has = _padded_flash(cfg, t, tp, s, sp, query, key, value, bias,
                                mask, qseg, kvseg, kv_tables, q_tables)
  lse = jnp.where(has, lse, -jnp.inf) if need_lse else None
  return out[..., :hv], lse


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _padded_flash(cfg, t, tp, s, sp, query, key, value, bias, mask, qseg,
                  kvseg, kv_tables, q_tables):
  # jit: identical calls (same shapes and config) reuse one compilation,
  # which matters in interpret mode where compiling dominates.
  q = jnp.pad(query, ((0, 0), (0, tp - t), (0, 0), (0, 0)))
  k = jnp.pad(key, ((0, 0), (0, sp - s), (0, 0), (0, 0)))
  v = jnp.pad(value, ((0, 0), (0, sp - s), (0, 0), (0, 0)))
  if cfg.heads_major:
    q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
  out, lse, has = _flash(cfg, q, k, v, bias, mask, qseg, kvseg, kv_tables,
                         q_tables)
  if cfg.heads_major:
    out = jnp.swapaxes(out, 1, 2)
  return out[:, :t], lse[:, :, :t, 0], has[:, :, :t, 0]


def flash_attention(query, key, value, *, is_causal: bool = False,
                    scale: Optional[float] = None,
                    interpret: Optional[bool] = None, bias=None, mask=None,
                    local_window_size=None, q_segment_ids=None,
                    kv_segment_ids=None,
                    block_sizes: Optional[BlockSizes] = None,
                    return_lse: bool = False, heads_major: Optional[bool] = None):
  """Flash attention as Pallas kernels, differentiable (custom_vjp).

  Args:
    query: [B, T, N, H]; key: [B, S, K, H]; value: [B, S, K, Hv]; N % K == 0.
    is_causal: query i sees keys j <= i (top-left aligned, as jax.nn).
    scale: logit scale, default 1/sqrt(H).
    interpret: run the kernels in Pallas interpret mode; None -> True on CPU.
    bias: float, broadcastable to [B, N, T, S]; added to the scaled logits
      (differentiable).
    mask: bool, broadcastable to [B, N, T, S]; True = attend.
    local_window_size: int w or (left, right): query i sees [i-left, i+right];
      key tiles outside the band are never visited.
    q_segment_ids, kv_segment_ids: int [B, T] / [B, S]; attend only within
      equal ids (packing; padding via an id nothing else uses).
    block_sizes: `BlockSizes`; default `BlockSizes.get_default()`.
    return_lse: also return the log-sum-exp [B, N, T] float32 (-inf on rows
      with nothing to attend to); it is differentiable too.
    heads_major: kernel-side layout; None -> [B, T, N, H] read in place on
      GPU, heads moved in front elsewhere. Exposed for testing.

  Returns:
    out [B, T, N, Hv] in query.dtype (and lse when return_lse).
  """
  out, lse = flash_entry(
      query, key, value, bias=bias, mask=mask, is_causal=is_causal,
      scale=scale, local_window_size=local_window_size,
      q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
      block_sizes=block_sizes, interpret=interpret, heads_major=heads_major,
      need_lse=bool(return_lse))
  return (out, lse) if return_lse else out


def mha_reference(query, key, value, *, is_causal: bool = False,
                  scale: Optional[float] = None, bias=None, mask=None,
                  local_window_size=None, q_segment_ids=None,
                  kv_segment_ids=None, return_lse: bool = False):
  """Plain-jnp softmax attention with the same semantics (float32 math)."""
  b, t, n, s, nkv, h, hv = check_inputs(query, key, value)
  g = n // nkv
  scale = default_scale(scale, h)
  kf = jnp.repeat(key.astype(jnp.float32), g, axis=2)
  vf = jnp.repeat(value.astype(jnp.float32), g, axis=2)
  logits = jnp.einsum("btnh,bsnh->bnts", query.astype(jnp.float32), kf,
                      precision=lax.Precision.HIGHEST) * scale
  if bias is not None:
    logits = logits + jnp.asarray(bias).astype(jnp.float32)
  valid = jnp.ones((1, 1, t, s), bool)
  qi = jnp.arange(t)[:, None]
  kj = jnp.arange(s)[None, :]
  if is_causal:
    valid = valid & (kj <= qi)
  window = normalize_window(local_window_size)
  if window is not None:
    valid = valid & (kj >= qi - window[0]) & (kj <= qi + window[1])
  if mask is not None:
    valid = valid & jnp.asarray(mask)
  if q_segment_ids is not None:
    valid = valid & (q_segment_ids[:, None, :, None] ==
                     kv_segment_ids[:, None, None, :])
  valid = jnp.broadcast_to(valid, logits.shape)
  logits = jnp.where(valid, logits, -jnp.inf)
  m = jnp.max(logits, axis=-1, keepdims=True)
  m = lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
  p = jnp.where(valid, jnp.exp(logits - m), 0.0)
  l = jnp.sum(p, axis=-1, keepdims=True)
  w = p / jnp.where(l > 0, l, 1.0)
  out = jnp.einsum("bnts,bsnd->btnd", w, vf,
                   precision=lax.Precision.HIGHEST).astype(query.dtype)
  lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)[..., 0]
  return (out, lse) if return_lse else out
