"""Memory-efficient softmax attention in pure JAX ("chunked").

Forward: for each query block, an online-softmax loop over key/value blocks
(running max `m`, normalizer `l`, unnormalized accumulator), saving only the
output and the log-sum-exp. Backward (`jax.custom_vjp`): a scan over key/value
blocks with an inner loop over query blocks that recomputes each block's
probabilities from the saved row statistics (`p = exp((s - m) - log l)`:
the max and log-normalizer kept apart, exact when |m| is huge), so no
[T, S] array is ever stored. Peak memory is O(B N (T + S) H + block_q block_kv).

Attention dropout (`dropout_rate` > 0) is applied block by block: each keep
decision is a counter-based hash of (key, example, head, query position, key
position) (`dropout_keep`), recomputed in the backward, so dropout costs no
[T, S] memory, compiles in about the time of the plain kernel, and gives the
same result for any block sizes. (Its random stream differs from the 'xla'
backend's jax.random mask; `dropout_keep_mask` builds the full mask.)

With `is_causal` or a local window, the loops visit only the blocks that
intersect the band (the loop bounds are computed per block), so causal
attention costs about half of non-causal.

Padding: T and S are padded up to multiples of the block sizes outside the
custom_vjp (so autodiff handles the padding); padded keys are masked.

Soft cap, sinks, position offsets and precision (see `_common`): the cap is
applied to each block's logits (its derivative 1 - tanh^2 recomputed in the
backward); a head's sink logit starts each row's running max and normalizer
(m = sink, l = 1), so it takes its share of the softmax mass and no value,
and its gradient is -sum_rows p_sink * (rowsum(dO * O) - dlse); the position
shift moves the band (loop bounds and masks), per example when the offsets
are arrays.

Layout: inside the custom_vjp everything is head-major (q [B, K, G, T, H],
k/v [B, K, S, H]); the wrapper transposes once on the way in and out. Every
block product reads row-by-column operands (what the CPU matmul needs, else
XLA copies a transposed operand per block): the forward slices key blocks
from K^T (transposed once) and folds the scale into the query block; the
backward works on transposed blocks (keys x queries), so P^T dO, dS^T Q,
V dO^T and K^T dS^T need no transpose of the [bk, bq] blocks, and dQ is
accumulated transposed. Causal and windowed calls mask only the blocks the
band's edge crosses (`_kv_split`, `_q_split`); interior blocks skip the mask.
Without dropout and with >= 32-bit values the forward's row sums come out of
the P V product (V gets a ones column), so no block pass sums P.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels._rules import round_up

from attnjax.softmax._common import (AttentionCall, KV_PAD_SEGMENT,
                                     MASK_VALUE, Q_PAD_SEGMENT,
                                     empty_result)

# Default (block_q, block_kv) per platform. On CPU, blocks whose logits fit
# in cache win: 256 x 256 measured fastest at S=2048 (see docs/benchmarks).
DEFAULT_BLOCKS = {"cpu": (256, 256)}
DEFAULT_BLOCKS_OTHER = (512, 1024)


def default_blocks():
  return DEFAULT_BLOCKS.get(jax.default_backend(), DEFAULT_BLOCKS_OTHER)


@dataclasses.dataclass(frozen=True)
class _Config:
  scale: float
  left: float      # query i sees keys >= i - left (inf: unbounded)
  right: float     # query i sees keys <= i + right (inf: unbounded)
  block_q: int
  block_kv: int
  kv_len: int      # true key length; keys at or past it are padding
  dropout_rate: float = 0.0
  shift: int = 0   # static position shift (query i at key coordinate i+shift)
  soft_cap: Optional[float] = None
  precision: Optional[Tuple[Any, Any]] = None   # (q.k, p.v)

  @property
  def prec_qk(self):
    return None if self.precision is None else self.precision[0]

  @property
  def prec_pv(self):
    return None if self.precision is None else self.precision[1]


def _slice_blocks(x, i, j, bq, bk):
  """Slices a rank-5 [.., .., .., T|1, S|1] array at query block i, key block j."""
  if x.shape[3] != 1:
    x = lax.dynamic_slice_in_dim(x, i * bq, bq, axis=3)
  if x.shape[4] != 1:
    x = lax.dynamic_slice_in_dim(x, j * bk, bk, axis=4)
  return x


def _block_mask(cfg: _Config, i, j, mask, q_seg, kv_seg, s_pad, shift=None,
                band: bool = True):
  """Boolean mask broadcastable to [B, K, G, bq, bk] for block (i, j);
  `shift` (int32 [B] or None) adds to cfg.shift per example. With
  band=False the window/causal band and the key padding are left out (for
  blocks `_kv_split`/`_q_split` found entirely inside the band)."""
  bq, bk = cfg.block_q, cfg.block_kv
  parts = []
  if not band:
    cfg = dataclasses.replace(cfg, left=math.inf, right=math.inf)
    s_pad = cfg.kv_len
  qpos = i * bq + jnp.arange(bq, dtype=jnp.int32)[:, None] + cfg.shift
  kpos = j * bk + jnp.arange(bk, dtype=jnp.int32)[None, :]
  if shift is not None:   # per example: rank 5 (explicit, rank-promotion safe)
    qpos = qpos[None, None, None] + shift.reshape(-1, 1, 1, 1, 1)
    kpos = kpos[None, None, None]
  if cfg.kv_len < s_pad:
    parts.append(kpos < cfg.kv_len)
  if math.isfinite(cfg.left):
    parts.append(kpos >= qpos - int(cfg.left))
  if math.isfinite(cfg.right):
    parts.append(kpos <= qpos + int(cfg.right))
  if mask is not None:
    parts.append(_slice_blocks(mask, i, j, bq, bk))
  if q_seg is not None:
    qs = lax.dynamic_slice_in_dim(q_seg, i * bq, bq, axis=1)
    ks = lax.dynamic_slice_in_dim(kv_seg, j * bk, bk, axis=1)
    parts.append((qs[:, :, None] == ks[:, None, :])[:, None, None])
  out = None
  for p in parts:
    # Ranks padded explicitly (jax_numpy_rank_promotion='raise' safe).
    p = p.reshape((1,) * (5 - p.ndim) + p.shape)
    out = p if out is None else out & p
  return out


def _dot(x, y, cx, cy, precision=None):
  """lax.dot_general over batch dims (0, 1) (batch, kv head), contracting
  x's dims `cx` with y's `cy`; output [B, K, x's free dims, y's free dims].
  Spelled out instead of jnp.einsum, which may swap the operands and
  transpose the result: the operand order fixes the orientation of the
  product, and on CPU each product must read row-by-column operands to run
  without a transpose copy."""
  return lax.dot_general(x, y, ((tuple(cx), tuple(cy)), ((0, 1), (0, 1))),
                         precision=precision,
                         preferred_element_type=jnp.float32)


def _g_first(x):
  """[B, K, R, G, C] -> [B, K, G, R, C] (a no-op copy when G == 1)."""
  return jnp.moveaxis(x, 3, 2)


def _block_logits(cfg: _Config, qi, kj, bias, i, j, with_cap_grad=False,
                  transposed=False):
  """Scaled, biased, soft-capped logits of block (i, j) (float32); with
  `with_cap_grad` also d(capped)/d(uncapped) (None without a cap).

  qi [B, K, G, bq, H] and the key block transposed, kj [B, K, H, bk]: logits
  [B, K, G, bq, bk]. `transposed`: the query block transposed, qi
  [B, K, G, H, bq], and kj [B, K, bk, H]: logits [B, K, G, bk, bq]. (Both
  are plain row-by-column products, so the CPU matmul needs no per-block
  transpose copy of an operand.)"""
  if transposed:
    s = _g_first(_dot(kj, qi, (3,), (3,), cfg.prec_qk)) * cfg.scale
  else:
    s = _dot(qi, kj, (4,), (2,), cfg.prec_qk) * cfg.scale
  if bias is not None:
    bij = _slice_blocks(bias, i, j, cfg.block_q, cfg.block_kv)
    s = s + (jnp.swapaxes(bij, -1, -2) if transposed else bij).astype(
        jnp.float32)
  dcap = None
  if cfg.soft_cap is not None:
    th = jnp.tanh(s / cfg.soft_cap)
    dcap = 1.0 - th * th
    # A -inf logit (from a -inf bias) stays -inf: it still masks.
    s = jnp.where(jnp.isneginf(s), s, cfg.soft_cap * th)
  return (s, dcap) if with_cap_grad else s


def _mix32(x):
  """murmur3's 32-bit finalizer: a bijection of uint32 with full avalanche."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def _seed_words(key_data):
  """Two uint32 seed words from any jax.random key's data."""
  words = jnp.asarray(key_data, jnp.uint32).reshape(-1)
  s0 = _mix32(words[0] ^ jnp.uint32(0x9E3779B9))
  s1 = _mix32(s0 ^ words[-1])
  for w in range(1, words.shape[0] - 1):
    s1 = _mix32(s1 ^ words[w])
  return s0, s1


def dropout_keep(key_data, rate: float, batch, head, row, col):
  """Keep decisions (bool, broadcast of the index arrays) of attention
  dropout at example `batch`, query head `head`, query position `row`, key
  position `col`: a counter-based hash of (key, indices) compared with
  (1 - rate) * 2**32. A pure function of global positions, so the forward
  and the backward regenerate the same mask block by block, and the result
  does not depend on the block sizes. (Not the stream of jax.random: the
  'xla' backend's masks differ.)"""
  s0, s1 = _seed_words(key_data)
  u = lambda a: jnp.asarray(a).astype(jnp.uint32)
  x = _mix32(s0 ^ _mix32(u(batch) * jnp.uint32(0x27D4EB2F) ^ u(head)))
  x = _mix32(x ^ u(row) * jnp.uint32(0x165667B1))
  x = _mix32(x ^ s1 ^ u(col) * jnp.uint32(0x61C88647))
  threshold = min(int(round((1.0 - rate) * 2.0 ** 32)), 2 ** 32 - 1)
  return x < jnp.uint32(threshold)


def dropout_keep_mask(key, rate: float, batch: int, heads: int, q_len: int,
                      kv_len: int):
  """The full [B, N, T, S] keep mask the 'chunked' backend applies (for
  analysis and tests; the backend itself never builds it)."""
  kd = jax.random.key_data(key) if jnp.issubdtype(
      getattr(key, "dtype", None), jax.dtypes.prng_key) else key
  ar = lambda n, ax: jnp.arange(n).reshape((1,) * ax + (-1,) + (1,) * (3 - ax))
  return dropout_keep(kd, rate, ar(batch, 0), ar(heads, 1), ar(q_len, 2),
                      ar(kv_len, 3))


def _block_keep(cfg: _Config, rng, i, j, shape):
  """Keep mask of block (i, j), shape [B, K, G, bq, bk]; None without
  dropout."""
  if cfg.dropout_rate == 0.0:
    return None
  b, nkv, g, bq, bk = shape
  ar = lambda n, ax: jnp.arange(n).reshape((1,) * ax + (-1,) + (1,) * (4 - ax))
  head = ar(nkv, 1) * g + ar(g, 2)          # query head of (kv head, group)
  return dropout_keep(rng, cfg.dropout_rate, ar(b, 0), head,
                      i * bq + ar(bq, 3), j * bk + ar(bk, 4))


def _dropped(cfg: _Config, x, keep):
  """x * keep / (1 - rate) (x itself when keep is None)."""
  if keep is None:
    return x
  return jnp.where(keep, x / (1.0 - cfg.dropout_rate), 0.0)


def _shift_bounds(cfg: _Config, shift):
  """(smallest, largest) position shift over the batch."""
  if shift is None:
    return cfg.shift, cfg.shift
  return cfg.shift + jnp.min(shift), cfg.shift + jnp.max(shift)


def _kv_range(cfg: _Config, i, nk_valid: int, shift=None):
  """Key blocks [lo, hi) that query block i can see (hi <= lo: none)."""
  bq, bk = cfg.block_q, cfg.block_kv
  lo = jnp.int32(0)
  hi = jnp.int32(nk_valid)
  sh_lo, sh_hi = _shift_bounds(cfg, shift)
  if math.isfinite(cfg.left):
    lo = jnp.maximum(0, (i * bq + sh_lo - int(cfg.left)) // bk)
  if math.isfinite(cfg.right):
    hi = jnp.minimum(nk_valid,
                     (i * bq + bq - 1 + sh_hi + int(cfg.right)) // bk + 1)
  return lo, hi


def _q_range(cfg: _Config, j, nq: int, shift=None):
  """Query blocks [lo, hi) that can see key block j (hi <= lo: none)."""
  bq, bk = cfg.block_q, cfg.block_kv
  lo = jnp.int32(0)
  hi = jnp.int32(nq)
  sh_lo, sh_hi = _shift_bounds(cfg, shift)
  if math.isfinite(cfg.right):
    lo = jnp.maximum(0, (j * bk - sh_hi - int(cfg.right)) // bq)
  if math.isfinite(cfg.left):
    hi = jnp.minimum(nq, (j * bk + bk - 1 - sh_lo + int(cfg.left)) // bq + 1)
  return lo, hi


def _ceil_div(a, b: int):
  return -((-a) // b)


def _kv_split(cfg: _Config, i, lo, hi, shift=None):
  """Splits query block i's key blocks [lo, hi) as [lo, flo) masked,
  [flo, fhi) inside the band (no band or key-padding mask needed), [fhi, hi)
  masked; returns (flo, fhi, edge_lo, edge_hi), the edges static (False:
  that masked range is always empty)."""
  bq, bk = cfg.block_q, cfg.block_kv
  sh_lo, sh_hi = _shift_bounds(cfg, shift)
  edge_lo = math.isfinite(cfg.left)
  padded = cfg.kv_len % bk != 0
  edge_hi = math.isfinite(cfg.right) or padded
  flo, fhi = lo, hi
  if edge_lo:   # every query of the block sees key j*bk: j*bk >= q_max - left
    flo = jnp.clip(_ceil_div(i * bq + bq - 1 + sh_hi - int(cfg.left), bk),
                   lo, hi)
  if math.isfinite(cfg.right):   # (j+1)*bk - 1 <= q_min + right
    fhi = (i * bq + sh_lo + int(cfg.right) + 1) // bk
  if padded:    # the last key block holds padding
    fhi = jnp.minimum(fhi, cfg.kv_len // bk)
  if edge_hi:
    fhi = jnp.clip(fhi, flo, hi)
  return flo, fhi, edge_lo, edge_hi


def _q_split(cfg: _Config, j, lo, hi, shift=None):
  """`_kv_split` for the backward: key block j's query blocks [lo, hi)."""
  bq, bk = cfg.block_q, cfg.block_kv
  sh_lo, sh_hi = _shift_bounds(cfg, shift)
  padded = cfg.kv_len % bk != 0
  edge_lo = math.isfinite(cfg.right) or padded
  edge_hi = math.isfinite(cfg.left)
  flo, fhi = lo, hi
  if math.isfinite(cfg.right):   # (j+1)*bk - 1 <= q_min + right
    flo = _ceil_div(j * bk + bk - 1 - sh_lo - int(cfg.right), bq)
  if padded:    # a key block holding padding is masked for every query block
    flo = jnp.where((j + 1) * bk > cfg.kv_len, hi, flo)
  if edge_lo:
    flo = jnp.clip(flo, lo, hi)
  if edge_hi:   # j*bk >= q_max - left
    fhi = jnp.clip((j * bk + int(cfg.left) - sh_hi + 1) // bq, flo, hi)
  return flo, fhi, edge_lo, edge_hi


def _split_loop(lo, hi, split, body, init):
  """fori_loop of body(idx, carry, band) over [lo, hi): band=False on the
  blocks inside the band, band=True (full masking) on the edge blocks."""
  flo, fhi, edge_lo, edge_hi = split
  carry = init
  if edge_lo:
    carry = lax.fori_loop(lo, flo, functools.partial(body, band=True), carry)
  carry = lax.fori_loop(flo, fhi, functools.partial(body, band=False), carry)
  if edge_hi:
    carry = lax.fori_loop(fhi, hi, functools.partial(body, band=True), carry)
  return carry


def _forward(cfg: _Config, q, k, v, bias, mask, q_seg, kv_seg, rng, sinks,
             shift):
  b, nkv, g, t_pad, h = q.shape
  s_pad, hv = k.shape[2], v.shape[-1]
  bq, bk = cfg.block_q, cfg.block_kv
  nq = t_pad // bq
  nk_valid = -(-cfg.kv_len // bk)
  kt = jnp.swapaxes(k, -1, -2)   # [B, K, H, S]: once, not per block
  # The scale goes into the query block (a [bq, H] product per query block
  # instead of a pass over every [bq, bk] logits block, which XLA on CPU
  # writes out before the row max): exact when it is a power of two, a
  # rounding of the logits otherwise, so not done for 16-bit queries there.
  fold = (jnp.dtype(q.dtype).itemsize >= 4
          or math.frexp(cfg.scale)[0] == 0.5)
  cfg_logits = dataclasses.replace(cfg, scale=1.0) if fold else cfg

  # Without dropout and with >= 32-bit values, the row sums come out of the
  # P V product: V gets a ones column (once, here), so the normalizer is the
  # accumulator's last column and no block pass sums P (XLA:CPU reads each
  # [bq, bk] block once more for a separate sum). (16-bit values would round
  # P before the sum, so they keep the separate float32 sum.)
  ones_col = (cfg.dropout_rate == 0.0
              and jnp.dtype(v.dtype).itemsize >= 4)
  vv = v
  if ones_col:
    vv = jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), v.dtype)], -1)

  def q_block(i):
    qi = lax.dynamic_slice_in_dim(q, i * bq, bq, axis=3)
    if fold:
      qi = qi * jnp.asarray(cfg.scale, qi.dtype)

    def body(j, carry, band):
      acc, m, l = carry
      ktj = lax.dynamic_slice_in_dim(kt, j * bk, bk, axis=3)
      vj = lax.dynamic_slice_in_dim(vv, j * bk, bk, axis=2)
      s = _block_logits(cfg_logits, qi, ktj, bias, i, j)
      msk = _block_mask(cfg, i, j, mask, q_seg, kv_seg, s_pad, shift, band)
      if msk is not None:
        s = jnp.where(msk, s, MASK_VALUE)
      m_new = jnp.maximum(m, jnp.max(s, axis=-1))
      m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)
      p = jnp.exp(s - m_safe[..., None])
      if msk is not None:
        p = jnp.where(msk, p, 0.0)
      alpha = jnp.exp(m - m_safe)
      if ones_col:
        pv = _dot(p.astype(v.dtype), vj, (4,), (2,), cfg.prec_pv)
        return alpha[..., None] * acc + pv, m_new, l
      l = alpha * l + jnp.sum(p, axis=-1)
      # Dropout acts on the normalized weights: drop from the numerator,
      # keep the normalizer (and the lse) of the undropped softmax.
      keep = _block_keep(cfg, rng, i, j, p.shape)
      pv = _dot(_dropped(cfg, p, keep).astype(v.dtype), vj, (4,), (2,),
                cfg.prec_pv)
      acc = alpha[..., None] * acc + pv
      return acc, m_new, l

    if sinks is None:
      m0 = jnp.full((b, nkv, g, bq), -jnp.inf, jnp.float32)
      l0 = jnp.zeros((b, nkv, g, bq), jnp.float32)
    else:
      # The sink starts the row: running max = sink, normalizer exp(0) = 1.
      m0 = jnp.broadcast_to(sinks, (b, nkv, g, bq))
      l0 = jnp.where(jnp.isneginf(m0), 0.0, 1.0)
    if ones_col:   # the normalizer rides in the accumulator's last column
      acc0 = jnp.concatenate(
          [jnp.zeros((b, nkv, g, bq, hv), jnp.float32), l0[..., None]], -1)
      init = (acc0, m0, None)
    else:
      init = (jnp.zeros((b, nkv, g, bq, hv), jnp.float32), m0, l0)
    lo, hi = _kv_range(cfg, i, nk_valid, shift)
    acc, m, l = _split_loop(lo, hi, _kv_split(cfg, i, lo, hi, shift), body,
                            init)
    if ones_col:
      acc, l = acc[..., :hv], acc[..., hv]
    has = l > 0   # the row has something to attend to (never a sentinel test)
    out = acc / jnp.where(has, l, 1.0)[..., None]
    # Row statistics: m and log(l) separately (lse = m + log l rounds log l
    # away when |m| ~ 1e38, so the backward recomputes p from the pair);
    # 0 on rows with nothing to attend to (finite: no inf is formed; the
    # entry point turns their lse into -inf only when it is asked for).
    logl = jnp.log(jnp.where(has, l, 1.0))
    m = jnp.where(has, m, 0.0)
    return out.astype(q.dtype), (m + logl, m, logl, has)

  outs, stats = lax.map(q_block, jnp.arange(nq, dtype=jnp.int32))
  # outs: [nq, B, K, G, bq, Hv] -> [B, K, G, T, Hv]; stats: [nq, B, K, G, bq]
  out = jnp.moveaxis(outs, 0, 3).reshape(b, nkv, g, t_pad, hv)
  lse, m, logl, has = (jnp.moveaxis(x, 0, 3).reshape(b, nkv, g, t_pad)
                       for x in stats)
  return out, lse, m, logl, has


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunked(cfg, q, k, v, bias, mask, q_seg, kv_seg, rng, sinks, shift):
  """(out, lse, has): lse is 0 where `has` (bool) is False."""
  out, lse, _, _, has = _forward(cfg, q, k, v, bias, mask, q_seg, kv_seg, rng,
                                 sinks, shift)
  return out, lse, has


def _chunked_fwd(cfg, q, k, v, bias, mask, q_seg, kv_seg, rng, sinks, shift):
  out, lse, m, logl, has = _forward(cfg, q, k, v, bias, mask, q_seg, kv_seg,
                                    rng, sinks, shift)
  return (out, lse, has), (q, k, v, bias, mask, q_seg, kv_seg, rng, sinks,
                           shift, out, m, logl)


def _reduce_to(x, shape):
  """Sums x over the axes where `shape` has 1 (broadcast axes)."""
  axes = tuple(a for a, (xs, ts) in enumerate(zip(x.shape, shape))
               if ts == 1 and xs != 1)
  return jnp.sum(x, axis=axes, keepdims=True) if axes else x


def _chunked_bwd(cfg, res, cts):
  q, k, v, bias, mask, q_seg, kv_seg, rng, sinks, shift, out, m, logl = res
  dout, dlse, _ = cts   # `has` is boolean: no cotangent
  b, nkv, g, t_pad, h = q.shape
  s_pad, hv = k.shape[2], v.shape[-1]
  bq, bk = cfg.block_q, cfg.block_kv
  nq, nk = t_pad // bq, s_pad // bk

  # D_i = rowsum(dO * O): [B, K, G, T].
  delta = jnp.einsum("bkgtd,bkgtd->bkgt", dout.astype(jnp.float32),
                     out.astype(jnp.float32), precision=cfg.prec_pv)
  dlse = jnp.zeros_like(m) if dlse is None else dlse.astype(jnp.float32)
  # ds = p * (dp - D + dlse): fold the two row terms into one.
  row_term = delta - dlse

  # The backward works on transposed blocks (rows: keys, columns: queries),
  # [B, K, G, bk, bq]: then dV = P^T dO, dK = dS^T Q, dP^T = V dO^T and
  # dQ^T = K^T dS^T are all plain row-by-column products. (In the [bq, bk]
  # orientation the CPU matmul needs P and dS transposed, and XLA
  # recomputed each of them a second time in transposed order, per block.)
  # dQ is accumulated transposed, [B, K, G, H, T].
  qt = jnp.swapaxes(q, -1, -2)
  dout_t = jnp.swapaxes(dout, -1, -2)

  def kv_block(carry, j):
    dqt, dbias = carry
    kj = lax.dynamic_slice_in_dim(k, j * bk, bk, axis=2)
    vj = lax.dynamic_slice_in_dim(v, j * bk, bk, axis=2)
    ktj = jnp.swapaxes(kj, -1, -2)

    def body(i, c, band):
      dk, dv, dqt, dbias = c
      qi = lax.dynamic_slice_in_dim(q, i * bq, bq, axis=3)
      qti = lax.dynamic_slice_in_dim(qt, i * bq, bq, axis=4)
      doi = lax.dynamic_slice_in_dim(dout, i * bq, bq, axis=3)
      doti = lax.dynamic_slice_in_dim(dout_t, i * bq, bq, axis=4)
      # Row statistics broadcast along the key rows: [B, K, G, 1, bq].
      m_i = lax.dynamic_slice_in_dim(m, i * bq, bq, axis=3)[..., None, :]
      logl_i = lax.dynamic_slice_in_dim(logl, i * bq, bq, axis=3)[..., None, :]
      r_i = lax.dynamic_slice_in_dim(row_term, i * bq, bq, axis=3)[..., None, :]
      st, dcap = _block_logits(cfg, qti, kj, bias, i, j, with_cap_grad=True,
                               transposed=True)
      msk = _block_mask(cfg, i, j, mask, q_seg, kv_seg, s_pad, shift, band)
      if msk is not None:
        msk = jnp.swapaxes(msk, -1, -2)
        st = jnp.where(msk, st, MASK_VALUE)
      # p = exp(s - lse) with lse = m + log l kept as the pair: exact even
      # when |m| is so large that m + log l rounds to m.
      pt = jnp.exp((st - m_i) - logl_i)
      if msk is not None:
        pt = jnp.where(msk, pt, 0.0)
      # With dropout, out = (P o M / (1 - r)) V: dV uses the dropped
      # weights, dP = (dO V^T) o M / (1 - r), and rowsum(dP o P) is still
      # rowsum(dO o out) = delta.
      keep = _block_keep(cfg, rng, i, j, (b, nkv, g, bq, bk))  # once for both
      if keep is not None:
        keep = jnp.swapaxes(keep, -1, -2)
      dv = dv + _dot(_dropped(cfg, pt, keep).astype(dout.dtype), doi,
                     (2, 4), (2, 3), cfg.prec_pv)
      dpt = _g_first(_dot(vj, doti, (3,), (3,), cfg.prec_pv))
      dst = pt * (_dropped(cfg, dpt, keep) - r_i)
      if dcap is not None:
        dst = dst * dcap    # through the soft cap
      dqti = _g_first(_dot(ktj, dst.astype(k.dtype), (3,), (3,),
                           cfg.prec_qk))
      dqt = lax.dynamic_update_slice_in_dim(
          dqt, lax.dynamic_slice_in_dim(dqt, i * bq, bq, axis=4) + dqti,
          i * bq, axis=4)
      dk = dk + _dot(dst.astype(q.dtype), qi, (2, 4), (2, 3), cfg.prec_qk)
      if dbias is not None:
        ds = jnp.swapaxes(dst, -1, -2)
        shape = bias.shape[:3] + (bq if bias.shape[3] != 1 else 1,
                                  bk if bias.shape[4] != 1 else 1)
        dsb = _reduce_to(ds, shape)
        ti = i * bq if bias.shape[3] != 1 else 0
        tj = j * bk if bias.shape[4] != 1 else 0
        cur = lax.dynamic_slice(dbias, (0, 0, 0, ti, tj), shape)
        dbias = lax.dynamic_update_slice(dbias, cur + dsb, (0, 0, 0, ti, tj))
      return dk, dv, dqt, dbias

    init = (jnp.zeros((b, nkv, bk, h), jnp.float32),
            jnp.zeros((b, nkv, bk, hv), jnp.float32), dqt, dbias)
    lo, hi = _q_range(cfg, j, nq, shift)
    dk, dv, dqt, dbias = _split_loop(lo, hi, _q_split(cfg, j, lo, hi, shift),
                                     body, init)
    return (dqt, dbias), (dk, dv)

  dqt0 = jnp.zeros(qt.shape, jnp.float32)
  dbias0 = None if bias is None else jnp.zeros(bias.shape, jnp.float32)
  (dqt, dbias), (dks, dvs) = lax.scan(kv_block, (dqt0, dbias0),
                                      jnp.arange(nk, dtype=jnp.int32))
  dq = jnp.swapaxes(dqt, -1, -2)
  # dks: [nk, B, K, bk, H] -> [B, K, S, H]; scale applied once here.
  dk = jnp.moveaxis(dks, 0, 2).reshape(b, nkv, s_pad, h) * cfg.scale
  dv = jnp.moveaxis(dvs, 0, 2).reshape(b, nkv, s_pad, hv)
  dq = dq * cfg.scale
  dbias = None if dbias is None else dbias.astype(bias.dtype)
  dsinks = None
  if sinks is not None:
    # d lse / d sink = p_sink, d out / d sink = -p_sink * out: the row
    # cotangent is p_sink * (dlse - rowsum(dO * O)) = -p_sink * row_term.
    p_sink = jnp.exp((sinks - m) - logl)
    dsinks = -jnp.sum(p_sink * row_term, axis=(0, 3), keepdims=True)
    dsinks = dsinks.astype(sinks.dtype)
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dbias,
          None, None, None, None, dsinks, None)


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def _to5(x, n, nkv, t, s, t_pad, s_pad, fill):
  """[B|1, N|1, T|1, S|1] -> padded [B|1, K|1, G|1, Tp|1, Sp|1]."""
  if x is None:
    return None
  pads = [(0, 0), (0, 0),
          (0, t_pad - t if x.shape[2] != 1 else 0),
          (0, s_pad - s if x.shape[3] != 1 else 0)]
  x = jnp.pad(x, pads, constant_values=fill)
  bx, nx, tx, sx = x.shape
  if nx == 1:
    return x.reshape(bx, 1, 1, tx, sx)
  return x.reshape(bx, nkv, n // nkv, tx, sx)


def chunked_attention(call: AttentionCall, *, block_q: Optional[int] = None,
                      block_kv: Optional[int] = None, need_lse: bool = True):
  """Backend entry: returns (out [B, T, N, Hv], lse [B, N, T] or None).

  lse is -inf on rows with nothing to attend to; with need_lse=False it is
  not returned (and no inf is ever produced, so jax.debug_infs holds).
  """
  b, t, n, s, nkv, h, hv = call.shape
  g = n // nkv
  for name, blk in (("block_q", block_q), ("block_kv", block_kv)):
    if blk is not None and (isinstance(blk, bool) or not isinstance(
        blk, (int, np.integer)) or blk <= 0):
      raise ValueError(f"`{name}` must be a positive int, got {blk!r}.")
  if 0 in (b, t, n, s, h, hv):
    return empty_result(call, need_lse)
  dq_, dk_ = default_blocks()
  bq = min(int(block_q or dq_), round_up(t, 8))
  bk = min(int(block_kv or dk_), round_up(s, 8))
  t_pad, s_pad = round_up(t, bq), round_up(s, bk)
  left, right = call.effective_window() or (math.inf, math.inf)
  static_shift = isinstance(call.position_shift, int)
  shift = None if static_shift else jnp.asarray(call.position_shift,
                                                jnp.int32)
  cfg = _Config(scale=call.scale, left=float(left), right=float(right),
                block_q=bq, block_kv=bk, kv_len=s,
                dropout_rate=float(call.dropout_rate),
                shift=call.position_shift if static_shift else 0,
                soft_cap=call.soft_cap, precision=call.precision)
  sinks = None
  if call.sinks is not None:
    sinks = call.sinks.astype(jnp.float32).reshape(1, nkv, g, 1)
  rng = None
  if cfg.dropout_rate > 0.0:
    rng = call.dropout_rng
    if jnp.issubdtype(getattr(rng, "dtype", None), jax.dtypes.prng_key):
      rng = jax.random.key_data(rng)
    rng = jnp.asarray(rng, jnp.uint32)
  # Head-major layout for the core: q [B, K, G, T, H], k/v [B, K, S, H].
  q = jnp.pad(call.query, ((0, 0), (0, t_pad - t), (0, 0), (0, 0)))
  q = q.reshape(b, t_pad, nkv, g, h).transpose(0, 2, 3, 1, 4)
  kv_pad = ((0, 0), (0, s_pad - s), (0, 0), (0, 0))
  k = jnp.pad(call.key, kv_pad).transpose(0, 2, 1, 3)
  v = jnp.pad(call.value, kv_pad).transpose(0, 2, 1, 3)
  bias = _to5(call.bias, n, nkv, t, s, t_pad, s_pad, 0.0)
  mask = _to5(call.mask, n, nkv, t, s, t_pad, s_pad, False)
  q_seg = kv_seg = None
  if call.q_segment_ids is not None:
    q_seg = jnp.pad(call.q_segment_ids, ((0, 0), (0, t_pad - t)),
                    constant_values=Q_PAD_SEGMENT)
    kv_seg = jnp.pad(call.kv_segment_ids, ((0, 0), (0, s_pad - s)),
                     constant_values=KV_PAD_SEGMENT)
  out, lse, has = _chunked(cfg, q, k, v, bias, mask, q_seg, kv_seg, rng,
                           sinks, shift)
  out = out.transpose(0, 3, 1, 2, 4).reshape(b, t_pad, n, hv)[:, :t]
  if not need_lse:
    return out, None
  lse = lse.reshape(b, n, t_pad)[:, :, :t]
  has = has.reshape(b, n, t_pad)[:, :, :t]
  return out, jnp.where(has, lse, -jnp.inf)
