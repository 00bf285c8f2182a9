"""Ring attention: context parallelism over one mesh axis with `ppermute`.

The sequence is split into P = mesh.shape[axis_name] shards. Each device keeps
its query shard and the key/value shards travel around the ring
(device d -> d + 1) with `jax.lax.ppermute`. After step s device d holds the
key/value shard of device (d - s) mod P, computes the attention of its queries
against it (a dense float32 block), and folds the partial result into a
running (output, log-sum-exp) pair with the online-softmax rule

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
  diagonal when the source is earlier and strict when it is later. Balanced,
  but with dense blocks each step still costs a full (T/P)^2 block (the mask
  only saves work in a block-sparse kernel).
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
ring once more, recomputing each block's probabilities from the saved lse
(FlashAttention-2's backward formulas per block); dq stays local and dk/dv
travel with their block and take one extra hop home at the end.
Communication: P-1 sends of (k, v) forward, P sends of (k, v, dk, dv) back.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec

from attnjax._checks import check_qkv, check_segment_ids
from attnjax.distributed._compat import (axis_size, check_batch_axis, place,
                                        shard_map)

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
  p = int(num_shards)
  pos = np.arange(seq_len)
  if layout == "contiguous":
    return pos
  if layout == "striped":
    if seq_len % p:
      raise ValueError(f"striped layout needs seq_len % num_shards == 0, got "
                       f"seq_len={seq_len}, num_shards={p}.")
    return pos.reshape(seq_len // p, p).T.reshape(-1)
  if seq_len % (2 * p):
    raise ValueError(f"zigzag layout needs seq_len % (2 * num_shards) == 0, "
                     f"got seq_len={seq_len}, num_shards={p}.")
  chunks = pos.reshape(2 * p, seq_len // (2 * p))
  order = np.stack([np.arange(p), 2 * p - 1 - np.arange(p)], axis=1).reshape(-1)
  return chunks[order].reshape(-1)


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
  axis = axis % x.ndim
  n = x.shape[axis]
  p = int(num_shards)
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
  axis = axis % x.ndim
  n = x.shape[axis]
  p = int(num_shards)
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
# Dense float32 blocks (forward and FlashAttention-2 style backward).
# ----------------------------------------------------------------------------


def _logits(q, k, scale):
  """[b, t, n, h] x [b, s, kh, h] -> float32 [b, kh, g, t, s] (GQA grouped)."""
  b, t, n, h = q.shape
  kh = k.shape[2]
  qg = q.reshape(b, t, kh, n // kh, h)
  s = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=_F32)
  return s.astype(_F32) * scale


def _block_fwd(q, k, v, scale, mask):
  """Returns (out [b, t, n, hv] f32, lse [b, n, t] f32), -inf lse if empty."""
  b, t, n, _ = q.shape
  kh, hv = k.shape[2], v.shape[-1]
  s = _logits(q, k, scale)
  if mask is not None:
    s = jnp.where(mask, s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(s - m)
  l = jnp.sum(p, axis=-1, keepdims=True)
  o = jnp.einsum("bkgts,bskd->btkgd", p.astype(v.dtype), v,
                 preferred_element_type=_F32).astype(_F32)
  inv = jnp.where(l > 0, 1.0 / jnp.where(l > 0, l, 1.0), 0.0)  # [b,k,g,t,1]
  o = o * jnp.moveaxis(inv[..., 0], -1, 1)[..., None]
  lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)
  return o.reshape(b, t, n, hv), lse[..., 0].reshape(b, n, t)


def _block_bwd(q, k, v, scale, mask, do, lse, delta):
  """Gradients of one block given the *global* lse and delta = rowsum(dO*O).

  do: [b, t, n, hv] f32; lse, delta: [b, n, t] f32.
  Returns f32 (dq [b, t, n, h], dk [b, s, kh, h], dv [b, s, kh, hv]).
  """
  b, t, n, h = q.shape
  kh, hv = k.shape[2], v.shape[-1]
  g = n // kh
  s = _logits(q, k, scale)
  lse_g = lse.reshape(b, kh, g, t)[..., None]
  p = jnp.exp(s - jnp.where(jnp.isfinite(lse_g), lse_g, 0.0))
  if mask is not None:
    p = jnp.where(mask, p, 0.0)
  dog = do.reshape(b, t, kh, g, hv)
  dv = jnp.einsum("bkgts,btkgd->bskd", p, dog)
  dp = jnp.einsum("btkgd,bskd->bkgts", dog, v.astype(_F32))
  ds = p * (dp - delta.reshape(b, kh, g, t)[..., None])
  dq = jnp.einsum("bkgts,bskh->btkgh", ds, k.astype(_F32)) * scale
  qg = q.reshape(b, t, kh, g, h).astype(_F32)
  dk = jnp.einsum("bkgts,btkgh->bskh", ds, qg) * scale
  return dq.reshape(b, t, n, h), dk, dv


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
# Per-step plans. A "sub-block" is (query slice, kv slice, mask kind) over the
# local shards; results are padded back to the full local shapes.
# ----------------------------------------------------------------------------


def _tril(t, s, strict=False):
  return jnp.tril(jnp.ones((t, s), jnp.bool_), k=-1 if strict else 0)


def _with_segments(mask, segs, qsl, ksl):
  """Plan mask [t, s] (or None) & segment equality [b, 1, 1, t, s]."""
  if segs is None:
    return mask
  qs, ks = segs
  eq = (qs[:, qsl][:, None, None, :, None] == ks[:, ksl][:, None, None, None, :])
  return eq if mask is None else eq & mask


def _sub_fwd(q, k, v, scale, qsl, ksl, mask, segs=None):
  b, t, n, _ = q.shape
  hv = v.shape[-1]
  mask = _with_segments(mask, segs, qsl, ksl)
  o, l = _block_fwd(q[:, qsl], k[:, ksl], v[:, ksl], scale, mask)
  if qsl != slice(None):
    full_o = jnp.zeros((b, t, n, hv), _F32)
    full_l = jnp.full((b, n, t), -jnp.inf, _F32)
    o = full_o.at[:, qsl].set(o)
    l = full_l.at[:, :, qsl].set(l)
  return o, l


def _sub_bwd(q, k, v, scale, qsl, ksl, mask, do, lse, delta, segs=None):
  mask = _with_segments(mask, segs, qsl, ksl)
  dq, dk, dv = _block_bwd(q[:, qsl], k[:, ksl], v[:, ksl], scale, mask,
                          do[:, qsl], lse[:, :, qsl], delta[:, :, qsl])
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


_ALL = slice(None)


def _diag_plan(cfg, t):
  """Step 0 (own shard): causal within the shard for every causal layout."""
  return [(_ALL, _ALL, _tril(t, t) if cfg.is_causal else None)]


def _offdiag_branches(cfg, i, j, t):
  """Returns (pred, plan_if_true, plan_if_false) or (None, plan, None).

  A plan is a list of sub-blocks; an empty list means the step is skipped.
  """
  if not cfg.is_causal:
    return None, [(_ALL, _ALL, None)], None
  if cfg.layout == "contiguous":
    return j < i, [(_ALL, _ALL, None)], []
  if cfg.layout == "striped":
    mask = jnp.where(j < i, _tril(t, t), _tril(t, t, strict=True))
    return None, [(_ALL, _ALL, mask)], None
  c = t // 2  # zigzag: local = [chunk i | chunk 2P-1-i]
  lower = [(_ALL, slice(0, c), None)]     # j < i: all queries, first kv chunk
  upper = [(slice(c, None), _ALL, None)]  # j > i: second query chunk, all kv
  return j < i, lower, upper


def _run_plan_fwd(cfg, plan, q, k, v, segs=None):
  b, t, n, _ = q.shape
  o = jnp.zeros((b, t, n, v.shape[-1]), _F32)
  l = jnp.full((b, n, t), -jnp.inf, _F32)
  for qsl, ksl, mask in plan:
    o2, l2 = _sub_fwd(q, k, v, cfg.scale, qsl, ksl, mask, segs)
    o, l = (o2, l2) if len(plan) == 1 else _merge(o, l, o2, l2)
  return o, l


def _run_plan_bwd(cfg, plan, q, k, v, do, lse, delta, segs=None):
  dq = jnp.zeros(q.shape, _F32)
  dk = jnp.zeros(k.shape, _F32)
  dv = jnp.zeros(v.shape, _F32)
  for qsl, ksl, mask in plan:
    a, b_, c = _sub_bwd(q, k, v, cfg.scale, qsl, ksl, mask, do, lse, delta,
                        segs)
    dq, dk, dv = dq + a, dk + b_, dv + c
  return dq, dk, dv


def _step(cfg, i, j, run, t):
  """Runs `run(plan)` for the step of device i against the shard of device j."""
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
  if p > 1:
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
                   kv_segment_ids=None):
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
      with their key/value block. Rows with no key to attend give zeros.

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
  eff_layout = layout if is_causal else "contiguous"
  if is_causal:
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
  cfg = _Config(axis_name=axis_name, size=size, scale=float(scale),
                is_causal=bool(is_causal), layout=eff_layout)
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
