"""Ring attention: context parallelism over one mesh axis with `ppermute`.

The sequence is split into P = mesh.shape[axis_name] shards. Each device keeps
its query shard and the key/value shards travel around the ring
(device d -> d + 1) with `jax.lax.ppermute`. After step s device d holds the
key/value shard of device (d - s) mod P, computes the attention of its queries
against it with attnjax's memory-efficient 'chunked' backend
(`chunked_dot_product_attention(..., return_lse=True)`: an online softmax over
block_q x block_kv tiles, never a [T/P, S/P] array), and folds the partial
result into a running (output, log-sum-exp) pair with the online-softmax rule

    lse = log(exp(lse_a) + exp(lse_b))
    out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b,

so after P steps every device holds the exact attention of its queries over
the whole sequence (Liu, Zaharia & Abbeel 2023, "Ring Attention with
Blockwise Transformers"). The send of the next block is issued before the
current block is computed, so XLA may overlap the two.

Causal attention and load balance (`layout=`). With contiguous shards device
d sees only shards <= d: the steps against later shards are fully masked and
skipped (a `lax.cond`), but device P-1 then does P block-steps while device 0
does one, and every ring step waits for the slowest device. Two placements fix
this (both need T == S):

* 'zigzag' (default): the sequence is cut into 2P chunks and device d holds
  chunks d and 2P-1-d. Against any other device's shard exactly half of the
  block is visible and it is an unmasked rectangle: all local queries against
  the first kv chunk when the source is "earlier" (j < d), or the second
  query chunk against both kv chunks when it is "later" (j > d). Every device
  does the same work on every step: (2C x C) instead of (2C x 2C).
* 'striped' (Brandon et al. 2023, "Striped Attention"): device d holds
  positions d, d+P, d+2P, ...; every block is causal, inclusive of the
  diagonal when the source is earlier and strict when it is later (a causal
  block of queries 1.. against keys ..-1). Balanced; the chunked backend
  skips the tiles above the diagonal, so each step costs about half a
  (T/P)^2 block.
* 'contiguous': no permutation; the skipped steps make it unbalanced.

The permutation is applied to the global arrays (and undone on the output)
unless `permuted=True`, which says the caller already stores its sequence in
the layout's order (apply `to_ring_layout` once to tokens and positions in the
data pipeline; then no resharding happens inside the model). Non-causal
attention is order-independent over keys, so it never permutes.

Backward: a `jax.custom_vjp` with a ring backward, not autodiff through the
shard_map. Autodiff of the forward loop would store every step's key/value
block and probabilities as residuals, i.e. the whole sequence's keys/values
and a (T/P x T) probability slab per device, which undoes the memory scaling
that is the point of context parallelism. The custom backward saves only the
local q, k, v, output and log-sum-exp, then sends (k, v, dk, dv) around the
ring once more. Per block it recomputes the block's (out_b, lse_b) and feeds
the chunked backend's own backward the cotangents that make it produce the
block's share of the global gradient (do_b = w_b do, dlse_b = w_b (rowsum(do
o_b) - rowsum(do o)), w_b = exp(lse_b - lse): FlashAttention-2's backward
with the global lse); dq stays local and dk/dv travel with their block and
take one extra hop home at the end. The recomputed block forward costs about
2/7 of the backward's matmul FLOPs more than a backward that could be handed
the global residuals directly.
Communication: P-1 sends of (k, v) forward, P sends of (k, v, dk, dv) back.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec

from attnjax._checks import check_qkv, check_segment_ids, normalize_window
from attnjax.distributed._compat import (axis_size, check_batch_axis, place,
                                        shard_map)
from attnjax.softmax import chunked_dot_product_attention

LAYOUTS = ("zigzag", "striped", "contiguous")
_F32 = jnp.float32


# ----------------------------------------------------------------------------
# Sequence placements.
# ----------------------------------------------------------------------------


def _check_layout(layout: str) -> None:
  if layout not in LAYOUTS:
    raise ValueError(f"`layout` must be one of {LAYOUTS}, got {layout!r}.")


def ring_permutation(seq_len: int, num_shards: int, layout: str) -> np.ndarray:
  """Index array `perm` with `x_layout = x[perm]` along the sequence.

  Shard d of the permuted sequence is `x_layout[d*L:(d+1)*L]`, L = seq_len /
  num_shards. Use it to permute position ids or labels alongside tokens.
  """
  _check_layout(layout)
  p = _check_count("num_shards", num_shards)
  n = _check_count("seq_len", seq_len, allow_zero=True)
  pos = np.arange(n)
  if layout == "contiguous":
    return pos
  if layout == "striped":
    if n % p:
      raise ValueError(f"striped layout needs seq_len % num_shards == 0, got "
                       f"seq_len={seq_len}, num_shards={p}.")
    return pos.reshape(n // p, p).T.reshape(-1)
  if n % (2 * p):
    raise ValueError(f"zigzag layout needs seq_len % (2 * num_shards) == 0, "
                     f"got seq_len={seq_len}, num_shards={p}.")
  chunks = pos.reshape(2 * p, n // (2 * p))
  order = np.stack([np.arange(p), 2 * p - 1 - np.arange(p)], axis=1).reshape(-1)
  return chunks[order].reshape(-1)


def _check_count(name, value, allow_zero=False) -> int:
  """A positive (or non-negative) Python/NumPy integer, else ValueError."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(
      value, (int, np.integer)):
    raise ValueError(f"`{name}` must be an integer, got {value!r}.")
  if value < 0 or (value == 0 and not allow_zero):
    raise ValueError(f"`{name}` must be {'>= 0' if allow_zero else '>= 1'}, "
                     f"got {int(value)}.")
  return int(value)


def _check_axis(x, axis) -> int:
  """`axis` of `x` in [-ndim, ndim) (no wrap-around), as a non-negative int."""
  nd = np.ndim(x)
  if isinstance(axis, (bool, np.bool_)) or not isinstance(
      axis, (int, np.integer)) or not -nd <= axis < nd:
    raise ValueError(f"`axis` must be an integer in [{-nd}, {nd}) for an "
                     f"array of shape {tuple(np.shape(x))}, got {axis!r}.")
  return int(axis) % nd


def _split(x, axis, a, b):
  """Reshapes dim `axis` of size a*b into (a, b)."""
  return x.reshape(x.shape[:axis] + (a, b) + x.shape[axis + 1:])


def _merge_dims(x, axis):
  """Inverse of `_split`."""
  return x.reshape(x.shape[:axis] + (-1,) + x.shape[axis + 2:])


def to_ring_layout(x, num_shards: int, layout: str, axis: int = 1):
  """Reorders `x` along `axis` (the sequence) into the ring placement.

  Equal to `jnp.take(x, ring_permutation(...), axis)`, written with reshapes,
  flips and stacks (no gather/scatter), which XLA's sharding propagation and
  JAX's explicit-sharding rules handle without ambiguity.
  """
  axis = _check_axis(x, axis)
  n = x.shape[axis]
  p = _check_count("num_shards", num_shards)
  ring_permutation(n, p, layout)  # validates
  if layout == "contiguous":
    return x
  if layout == "striped":
    return _merge_dims(jnp.swapaxes(_split(x, axis, n // p, p), axis,
                                    axis + 1), axis)
  xs = _split(x, axis, 2 * p, n // (2 * p))
  first = lax.slice_in_dim(xs, 0, p, axis=axis)
  second = jnp.flip(lax.slice_in_dim(xs, p, 2 * p, axis=axis), axis=axis)
  pairs = jnp.stack([first, second], axis=axis + 1)  # [.., p, 2, c, ..]
  return _merge_dims(_merge_dims(pairs, axis + 1), axis)


def from_ring_layout(x, num_shards: int, layout: str, axis: int = 1):
  """Inverse of `to_ring_layout`."""
  axis = _check_axis(x, axis)
  n = x.shape[axis]
  p = _check_count("num_shards", num_shards)
  ring_permutation(n, p, layout)
  if layout == "contiguous":
    return x
  if layout == "striped":
    return _merge_dims(jnp.swapaxes(_split(x, axis, p, n // p), axis,
                                    axis + 1), axis)
  xs = _split(_split(x, axis, p, n // p), axis + 1, 2, n // (2 * p))
  first = lax.index_in_dim(xs, 0, axis=axis + 1, keepdims=False)
  second = lax.index_in_dim(xs, 1, axis=axis + 1, keepdims=False)
  chunks = jnp.concatenate([first, jnp.flip(second, axis=axis)], axis=axis)
  return _merge_dims(chunks, axis)


# ----------------------------------------------------------------------------
# Blocks: attnjax's memory-efficient 'chunked' backend (online softmax over
# block_q x block_kv tiles, returning the log-sum-exp), forward and backward.
# ----------------------------------------------------------------------------


_INF = float("inf")
FULL, CAUSAL, STRICT = (-_INF, _INF), (0.0, _INF), (1.0, _INF)


def _empty(q, v):
  b, t, n, _ = q.shape
  return (jnp.zeros((b, t, n, v.shape[-1]), _F32),
          jnp.full((b, n, t), -jnp.inf, _F32))


def _block(cfg, band, q, k, v, qs=None, ks=None):
  """Attention of a query block against a kv block under a diagonal band.

  Query i sees key j when lo <= i - j <= hi (local indices; band = (lo, hi),
  static, +-inf for open ends): (-inf, inf) is a full block, (0, inf)
  causal, (1, inf) strictly causal, finite ends come from local windows.
  Every case is one call of attnjax's memory-efficient 'chunked' backend
  (online softmax over block_q x block_kv tiles; it skips tiles outside the
  band and never builds a [t, s] mask): a band that excludes the diagonal
  is shifted onto it by dropping the leading keys (hi < 0) or queries
  (lo > 0), whose rows are then empty. Returns (out [b, t, n, hv] f32,
  lse [b, n, t] f32; -inf and zeros on rows that see nothing). Segment ids
  pass through; the backend zeroes key/value slots no query of the block
  can attend (so NaN/Inf there reach nothing).
  """
  t, s = q.shape[1], k.shape[1]
  lo, hi = max(band[0], -(s - 1)), min(band[1], t - 1)
  if lo > hi:
    return _empty(q, v)
  if hi < 0:                                  # keys j >= i + m only
    m = int(-hi)
    return _block(cfg, (lo + m, 0.0), q, k[:, m:], v[:, m:], qs,
                  None if ks is None else ks[:, m:])
  if lo > 0:                                  # queries i >= m see keys
    m = int(lo)
    o, l = _block(cfg, (0.0, hi - m), q[:, m:], k, v,
                  None if qs is None else qs[:, m:], ks)
    o0, l0 = _empty(q[:, :m], v)
    return jnp.concatenate([o0, o], axis=1), jnp.concatenate([l0, l], axis=2)
  window = None
  if lo > -(s - 1) or hi < t - 1:           # (left, right) = (hi, -lo)
    window = (int(hi), int(-lo))
  seg = {} if qs is None else dict(q_segment_ids=qs, kv_segment_ids=ks)
  o, l = chunked_dot_product_attention(
      q, k, v, scale=cfg.scale, local_window_size=window,
      block_q=cfg.block_q, block_kv=cfg.block_kv, return_lse=True, **seg)
  return o.astype(_F32), l


def _block_bwd(cfg, band, q, k, v, qs, ks, do, lse, delta):
  """Gradients of one block's share of the *global* attention.

  The global output is o = sum_b w_b o_b with w_b = exp(lse_b - lse), so the
  block's outputs get the cotangents do_b = w_b do and
  dlse_b = w_b (rowsum(do * o_b) - delta), delta = rowsum(do * o); the
  backend's own custom_vjp (which recomputes the block's tiles from the
  saved lse) turns them into the block's (dq, dk, dv). The block's forward
  is recomputed here (the ring keeps no per-block residuals: O(T/P) memory).
  do: [b, t, n, hv] f32; lse, delta: [b, n, t] f32.
  """
  (o_b, l_b), vjp = jax.vjp(
      lambda q, k, v: _block(cfg, band, q, k, v, qs, ks), q, k, v)
  ok = jnp.isfinite(l_b) & jnp.isfinite(lse)
  w = jnp.where(ok, jnp.exp(jnp.where(ok, l_b - lse, 0.0)), 0.0)  # [b,n,t]
  w_t = jnp.swapaxes(w, 1, 2)[..., None]                           # [b,t,n,1]
  rows = jnp.swapaxes(jnp.sum(do * o_b, axis=-1), 1, 2)            # [b,n,t]
  dq, dk, dv = vjp((w_t * do, w * (rows - delta)))
  return dq.astype(_F32), dk.astype(_F32), dv.astype(_F32)


def _merge(o1, l1, o2, l2):
  """Online-softmax merge of two partial attentions (o [b,t,n,d], l [b,n,t])."""
  m = jnp.maximum(l1, l2)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  w1, w2 = jnp.exp(l1 - m), jnp.exp(l2 - m)
  tot = w1 + w2
  lse = jnp.where(tot > 0, m + jnp.log(jnp.where(tot > 0, tot, 1.0)), -jnp.inf)
  safe = jnp.where(tot > 0, tot, 1.0)
  a1 = jnp.swapaxes(w1 / safe, 1, 2)[..., None]
  a2 = jnp.swapaxes(w2 / safe, 1, 2)[..., None]
  return o1 * a1 + o2 * a2, lse


# ----------------------------------------------------------------------------
# Per-step plans. A "sub-block" is (query slice, kv slice, kind) over the
# local shards; results are padded back to the full local shapes.
# ----------------------------------------------------------------------------


def _sl(x, sl):
  return None if x is None else x[:, sl]


def _sub_fwd(cfg, q, k, v, qsl, ksl, kind, segs=None):
  b, t, n, _ = q.shape
  hv = v.shape[-1]
  qs, ks = (None, None) if segs is None else segs
  o, l = _block(cfg, kind, q[:, qsl], k[:, ksl], v[:, ksl], _sl(qs, qsl),
                _sl(ks, ksl))
  if qsl != slice(None):
    full_o = jnp.zeros((b, t, n, hv), _F32)
    full_l = jnp.full((b, n, t), -jnp.inf, _F32)
    o = full_o.at[:, qsl].set(o)
    l = full_l.at[:, :, qsl].set(l)
  return o, l


def _sub_bwd(cfg, q, k, v, qsl, ksl, kind, do, lse, delta, segs=None):
  qs, ks = (None, None) if segs is None else segs
  dq, dk, dv = _block_bwd(cfg, kind, q[:, qsl], k[:, ksl], v[:, ksl],
                          _sl(qs, qsl), _sl(ks, ksl), do[:, qsl],
                          lse[:, :, qsl], delta[:, :, qsl])
  if qsl != slice(None):
    dq = jnp.zeros(q.shape, _F32).at[:, qsl].set(dq)
  if ksl != slice(None):
    dk = jnp.zeros(k.shape, _F32).at[:, ksl].set(dk)
    dv = jnp.zeros(v.shape, _F32).at[:, ksl].set(dv)
  return dq, dk, dv


@dataclasses.dataclass(frozen=True)
class _Config:
  axis_name: str
  size: int
  scale: float
  is_causal: bool
  layout: str
  block_q: Optional[int] = None
  block_kv: Optional[int] = None
  # Local window as a band on global positions: (lo, hi) = (-right, left),
  # query p sees key p' when lo <= p - p' <= hi. Contiguous layout only.
  window: Optional[Tuple[float, float]] = None


_ALL = slice(None)


def _global_band(cfg):
  lo, hi = FULL if cfg.window is None else cfg.window
  if cfg.is_causal:
    lo = max(lo, 0.0)
  return lo, hi


def _diag_plan(cfg, t):
  """Step 0 (own shard): causal within the shard for every causal layout."""
  if cfg.window is not None:
    return [(_ALL, _ALL, _global_band(cfg))]
  return [(_ALL, _ALL, CAUSAL if cfg.is_causal else FULL)]


def _window_plans(cfg, s, t):
  """Static plans of step s with a window (contiguous shards of length t).

  Device i then holds the kv shard of j = i - s (offset s*t behind) when
  i >= s, else of j = i - s + P (wrapped round: (s - P)*t). Returns
  (plan if i >= s, plan if i < s); [] where the band misses the block.
  """
  lo, hi = _global_band(cfg)
  plans = []
  for delta in (s * t, (s - cfg.size) * t):
    band = (lo - delta, hi - delta)
    hit = max(band[0], -(t - 1)) <= min(band[1], t - 1)
    plans.append([(_ALL, _ALL, band)] if hit else [])
  return plans


def _window_steps(cfg, t):
  """Ring steps s >= 1 whose block meets the window on some device."""
  return [s for s in range(1, cfg.size)
          if any(_window_plans(cfg, s, t))]


def _offdiag_branches(cfg, i, j, t):
  """Returns (pred, plan_if_true, plan_if_false) or (None, plan, None).

  A plan is a list of sub-blocks; an empty list means the step is skipped.
  """
  if not cfg.is_causal:
    return None, [(_ALL, _ALL, FULL)], None
  if cfg.layout == "contiguous":
    return j < i, [(_ALL, _ALL, FULL)], []
  if cfg.layout == "striped":
    # Earlier source: diagonal included; later source: strictly below it.
    return j < i, [(_ALL, _ALL, CAUSAL)], [(_ALL, _ALL, STRICT)]
  c = t // 2  # zigzag: local = [chunk i | chunk 2P-1-i]
  lower = [(_ALL, slice(0, c), FULL)]     # j < i: all queries, first kv chunk
  upper = [(slice(c, None), _ALL, FULL)]  # j > i: second query chunk, all kv
  return j < i, lower, upper


def _run_plan_fwd(cfg, plan, q, k, v, segs=None):
  b, t, n, _ = q.shape
  o = jnp.zeros((b, t, n, v.shape[-1]), _F32)
  l = jnp.full((b, n, t), -jnp.inf, _F32)
  for qsl, ksl, kind in plan:
    o2, l2 = _sub_fwd(cfg, q, k, v, qsl, ksl, kind, segs)
    o, l = (o2, l2) if len(plan) == 1 else _merge(o, l, o2, l2)
  return o, l


def _run_plan_bwd(cfg, plan, q, k, v, do, lse, delta, segs=None):
  dq = jnp.zeros(q.shape, _F32)
  dk = jnp.zeros(k.shape, _F32)
  dv = jnp.zeros(v.shape, _F32)
  for qsl, ksl, kind in plan:
    a, b_, c = _sub_bwd(cfg, q, k, v, qsl, ksl, kind, do, lse, delta, segs)
    dq, dk, dv = dq + a, dk + b_, dv + c
  return dq, dk, dv


def _step(cfg, i, j, run, t, s=None):
  """Runs `run(plan)` for the step of device i against the shard of device j
  (step `s`, static, with a window)."""
  if cfg.window is not None:
    pred = i >= s
    plan_t, plan_f = _window_plans(cfg, s, t)
  else:
    pred, plan_t, plan_f = _offdiag_branches(cfg, i, j, t)
  if pred is None:
    return run(plan_t)
  return lax.cond(pred, lambda: run(plan_t), lambda: run(plan_f))


# ----------------------------------------------------------------------------
# The ring (runs inside shard_map, one call per device).
# ----------------------------------------------------------------------------


def _perm(size):
  return [(d, (d + 1) % size) for d in range(size)]


def _segs(qseg, kvseg):
  return None if qseg is None else (qseg, kvseg)


def _ring_forward(cfg: _Config, q, k, v, qseg=None, kvseg=None):
  p = cfg.size
  t = q.shape[1]
  o, lse = _run_plan_fwd(cfg, _diag_plan(cfg, t), q, k, v, _segs(qseg, kvseg))
  if p == 1:
    return o, lse
  i = lax.axis_index(cfg.axis_name)
  if cfg.window is not None:
    # Static steps, only as far round the ring as the window reaches.
    steps = _window_steps(cfg, t)
    cur = (k, v, kvseg)
    for s in range(1, max(steps, default=0) + 1):
      cur = lax.ppermute(cur, cfg.axis_name, _perm(p))
      if s in steps:
        ks, vs, kvs = cur
        o2, l2 = _step(cfg, i, None, lambda plan: _run_plan_fwd(
            cfg, plan, q, ks, vs, _segs(qseg, kvs)), t, s)
        o, lse = _merge(o, lse, o2, l2)
    return o, lse

  def compute(s, kv, o, lse):
    j = (i - s) % p
    ks, vs, kvs = kv
    o2, l2 = _step(cfg, i, j, lambda plan: _run_plan_fwd(
        cfg, plan, q, ks, vs, _segs(qseg, kvs)), t)
    return _merge(o, lse, o2, l2)

  def body(s, carry):
    cur, o, lse = carry
    nxt = lax.ppermute(cur, cfg.axis_name, _perm(p))  # overlaps with compute
    o, lse = compute(s, cur, o, lse)
    return nxt, o, lse

  # Key segment ids travel with their key/value block.
  cur = lax.ppermute((k, v, kvseg), cfg.axis_name, _perm(p))
  cur, o, lse = lax.fori_loop(1, p - 1, body, (cur, o, lse))
  return compute(p - 1, cur, o, lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(cfg: _Config, q, k, v, qseg, kvseg):
  o, _ = _ring_forward(cfg, q, k, v, qseg, kvseg)
  return o.astype(q.dtype)


def _ring_fwd(cfg, q, k, v, qseg, kvseg):
  o, lse = _ring_forward(cfg, q, k, v, qseg, kvseg)
  o = o.astype(q.dtype)
  return o, (q, k, v, qseg, kvseg, o, lse)


def _ring_bwd(cfg, res, g):
  q, k, v, qseg, kvseg, o, lse = res
  p = cfg.size
  t = q.shape[1]
  do = g.astype(_F32)
  delta = jnp.swapaxes(jnp.sum(do * o.astype(_F32), axis=-1), 1, 2)  # [b,n,t]
  dq, dk, dv = _run_plan_bwd(cfg, _diag_plan(cfg, t), q, k, v, do, lse, delta,
                             _segs(qseg, kvseg))
  if p > 1 and cfg.window is not None:
    i = lax.axis_index(cfg.axis_name)
    steps = _window_steps(cfg, t)
    blk = (k, v, kvseg, dk, dv)
    last = max(steps, default=0)
    for s in range(1, last + 1):
      ks, vs, kvs, dks, dvs = lax.ppermute(blk, cfg.axis_name, _perm(p))
      if s in steps:
        a, b_, c = _step(cfg, i, None, lambda plan: _run_plan_bwd(
            cfg, plan, q, ks, vs, do, lse, delta, _segs(qseg, kvs)), t, s)
        dq, dks, dvs = dq + a, dks + b_, dvs + c
      blk = (ks, vs, kvs, dks, dvs)
    dk, dv = blk[3], blk[4]
    if last:
      # Block j's accumulators sit on device j + last: send them home.
      home = [(d, (d + p - last) % p) for d in range(p)]
      dk, dv = lax.ppermute((dk, dv), cfg.axis_name, home)
  elif p > 1:
    i = lax.axis_index(cfg.axis_name)

    def body(s, carry):
      dq, blk = carry
      ks, vs, kvs, dks, dvs = lax.ppermute(blk, cfg.axis_name, _perm(p))
      j = (i - s) % p
      a, b_, c = _step(cfg, i, j, lambda plan: _run_plan_bwd(
          cfg, plan, q, ks, vs, do, lse, delta, _segs(qseg, kvs)), t)
      return dq + a, (ks, vs, kvs, dks + b_, dvs + c)

    dq, (_, _, _, dk, dv) = lax.fori_loop(1, p, body,
                                          (dq, (k, v, kvseg, dk, dv)))
    # Block j's accumulators now sit on device j - 1: one more hop home.
    dk, dv = lax.ppermute((dk, dv), cfg.axis_name, _perm(p))
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None,
          None)


_ring.defvjp(_ring_fwd, _ring_bwd)


# ----------------------------------------------------------------------------
# Public entry point.
# ----------------------------------------------------------------------------


def ring_attention(query, key, value, *, mesh, axis_name: str,
                   is_causal: bool = False, scale: Optional[float] = None,
                   layout: str = "zigzag", permuted: bool = False,
                   batch_axis: Optional[str] = None, q_segment_ids=None,
                   kv_segment_ids=None, local_window_size=None,
                   block_q: Optional[int] = None,
                   block_kv: Optional[int] = None):
  """Exact softmax attention with the sequence sharded over `axis_name`.

  Args:
    query: [B, T, N, H] global array (any sharding; resharded to the ring).
    key, value: [B, S, K, H] / [B, S, K, Hv], N % K == 0 (GQA).
    mesh: a `jax.sharding.Mesh`.
    axis_name: the mesh axis the sequence is split over (P devices); T and S
      must be divisible by P (by 2P for causal 'zigzag').
    is_causal: query i sees keys j <= i; needs T == S.
    scale: logit scale, default 1/sqrt(H).
    layout: causal placement, 'zigzag' | 'striped' | 'contiguous' (see the
      module docstring); ignored when not causal.
    permuted: inputs are already in `layout` order (`to_ring_layout`) and the
      output is returned in that order; otherwise natural order in and out.
    batch_axis: optional mesh axis to shard the batch over as well (data
      parallel x context parallel).
    q_segment_ids, kv_segment_ids: optional int [B, T] / [B, S]: query i
      attends key j only when their ids are equal (packed sequences; key
      padding via an id no query uses). The key ids travel around the ring
      with their key/value block. Rows with no key to attend give zeros;
      whatever a key/value slot that no query of a block can attend holds
      (NaN, Inf) never reaches an output or gradient.
    local_window_size: optional int w or (left, right): query p attends key
      p' with p - left <= p' <= p + right (and p' <= p when causal); needs
      T == S. The shards stay contiguous (`layout` must be 'contiguous' when
      `permuted`), each step's block gets its band of the window, steps
      whose block lies outside it on every device are skipped, and the ring
      goes only as far round as the window reaches (a causal window of
      length w costs about ceil(w / (T/P)) + 1 blocks and hops per device,
      not P).
    block_q, block_kv: tile sizes of the per-step block computation (the
      'chunked' backend's online softmax; default: its platform defaults).

  Returns:
    [B, T, N, Hv] in query.dtype, sharded like
    `PartitionSpec(batch_axis, axis_name)`. Differentiable (custom_vjp with a
    ring backward); call it under `jax.jit`.
  """
  b, t, n, s, kh, h, hv = check_qkv(query, key, value, allow_unbatched=False)
  size = axis_size(mesh, axis_name, "axis_name")
  check_batch_axis(mesh, batch_axis, axis_name, b)
  _check_layout(layout)
  if t % size or s % size:
    raise ValueError(
        f"query length {t} and key length {s} must be divisible by the size "
        f"{size} of mesh axis {axis_name!r}; got query={tuple(query.shape)}, "
        f"key={tuple(key.shape)}.")
  window = normalize_window(local_window_size)
  if window is not None:
    if t != s:
      raise ValueError(
          "ring_attention with `local_window_size` needs equal query and key "
          f"lengths, got query={tuple(query.shape)}, key={tuple(key.shape)}.")
    if permuted and is_causal and layout != "contiguous":
      raise ValueError(
          "ring_attention with `local_window_size` keeps contiguous shards; "
          f"got permuted=True with layout={layout!r} (use 'contiguous').")
  eff_layout = layout if is_causal and window is None else "contiguous"
  if is_causal and window is None:
    if t != s:
      raise ValueError(
          "causal ring_attention needs equal query and key lengths, got "
          f"query={tuple(query.shape)}, key={tuple(key.shape)}.")
    if eff_layout == "zigzag" and t % (2 * size):
      raise ValueError(
          f"causal zigzag ring_attention needs the sequence length {t} to be "
          f"divisible by 2 * {size} (mesh axis {axis_name!r}); use "
          "layout='striped' or pad the sequence.")
  q_segment_ids, kv_segment_ids = check_segment_ids(
      q_segment_ids, kv_segment_ids, b, t, s)
  if scale is None:
    scale = 1.0 / float(np.sqrt(h))
  for name, val in (("block_q", block_q), ("block_kv", block_kv)):
    if val is not None:
      _check_count(name, val)
  cfg = _Config(axis_name=axis_name, size=size, scale=float(scale),
                is_causal=bool(is_causal), layout=eff_layout,
                block_q=block_q, block_kv=block_kv,
                window=None if window is None else (-float(window[1]),
                                                    float(window[0])))
  reorder = eff_layout != "contiguous" and not permuted
  spec = PartitionSpec(batch_axis, axis_name, None, None)
  gathered = PartitionSpec(batch_axis, None, None, None)
  seg_spec = PartitionSpec(batch_axis, axis_name)
  seg_gathered = PartitionSpec(batch_axis, None)
  segs = () if q_segment_ids is None else (q_segment_ids, kv_segment_ids)
  if reorder:
    query, key, value = (
        to_ring_layout(place(x, mesh, gathered), size, eff_layout)
        for x in (query, key, value))
    segs = tuple(to_ring_layout(place(x, mesh, seg_gathered), size,
                                eff_layout) for x in segs)
  query, key, value = (place(x, mesh, spec) for x in (query, key, value))
  segs = tuple(place(x, mesh, seg_spec) for x in segs)
  fn = shard_map(lambda q, k, v, qs=None, ks=None: _ring(cfg, q, k, v, qs, ks),
                 mesh=mesh, in_specs=(spec,) * 3 + (seg_spec,) * len(segs),
                 out_specs=spec)
  out = fn(query, key, value, *segs)
  if reorder:
    out = place(from_ring_layout(place(out, mesh, gathered), size, eff_layout),
                mesh, spec)
  return out


__all__ = ["LAYOUTS", "from_ring_layout", "ring_attention", "ring_permutation",
           "to_ring_layout"]
