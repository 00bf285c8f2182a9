"""Key-driven grouped-query attention (Khan et al. 2024, "Beyond Uniform Query
Distribution: Key-Driven Grouped Query Attention").

Standard GQA gives every key/value head the same number of query heads
(N / K, contiguous). KDGQA allocates query heads in proportion to the norms
of the key heads, recomputed at every forward pass:

  n_j    = sum_b || K_{b, :, j, :} ||_F            (key-head norms, [K])
  r_j    = (n_j - min n) / (max n - min n)         (min-max scaled; `minmax`)
  a_j    = round(r_j / sum r * N)                  (query heads for head j)
  while sum a > N: a[argmax a] -= 1 ; while sum a < N: a[argmin a] += 1

and query heads are assigned contiguously: the first a_0 query heads read
key/value head 0, the next a_1 head 1, and so on (a head may get none). The
paper's dynamic variant (DGQA) allocates from a running statistic instead:
pass `norms=` (e.g. an EMA kept by the caller, `ema_key_norms`) and
`minmax=False`. When all norms are equal the allocation is the uniform one.

`group_over="batch"` (the paper) sums the norms over the batch, so one
allocation serves the whole batch (examples then influence each other's
grouping); `"example"` allocates per example (what `vmap` over examples
computes). The allocation is integer (no gradient flows through it) and
shape-static, so the op works under jit.

Attention then runs `attnjax.dot_product_attention` with each query head's
assigned key/value head gathered to [B, S, N, H] (so memory is that of MHA
for the key/value tensors); masks, causality and every other keyword are
those of `dot_product_attention`. Key slots masked for every query are
zeroed before the norms are taken, so NaN/Inf there reach neither the
grouping nor the output.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from attnjax._dispatch import Op
from attnjax.nn import MultiHeadAttention
from attnjax.sequence import _common
from attnjax.softmax import dot_product_attention

__all__ = ["KeyDrivenGQAttention", "SUPPORT", "ema_key_norms", "key_driven_gqa",
           "key_driven_gqa_reference", "key_driven_head_groups",
           "key_head_norms", "allocate_query_heads"]

SUPPORT = {p: True for p in _common.PATTERNS}

_OP = Op("key_driven_gqa")


def key_head_norms(key, kv_mask=None, *, group_over: str = "batch"):
  """Frobenius norms of the key heads: [K] summed over the batch
  (group_over="batch") or [B, K] ("example"). `kv_mask` [B, S] drops
  positions (their keys count as zero)."""
  key = _common.zero_masked(jnp.asarray(key), kv_mask).astype(jnp.float32)
  norms = jnp.sqrt(jnp.sum(jnp.square(key), axis=(1, 3)))     # [B, K]
  return jnp.sum(norms, axis=0) if group_over == "batch" else norms


def ema_key_norms(cache, norms, beta: float = 0.9):
  """The DGQA running statistic: beta * norms + (1 - beta) * cache."""
  return beta * norms + (1.0 - beta) * cache


def allocate_query_heads(norms, num_heads: int, *, minmax: bool = True):
  """Query heads per key/value head from key norms [..., K] -> int [..., K]
  summing to num_heads (the rounding and repair of the module docstring)."""
  num_heads = _common.check_positive_int("num_heads", num_heads)
  norms = jax.lax.stop_gradient(jnp.asarray(norms, jnp.float32))
  kh = norms.shape[-1]
  if minmax:
    lo = jnp.min(norms, axis=-1, keepdims=True)
    hi = jnp.max(norms, axis=-1, keepdims=True)
    span = hi - lo
    r = jnp.where(span > 0, (norms - lo) / jnp.where(span > 0, span, 1.0), 1.0)
  else:
    r = norms
  tot = jnp.sum(r, axis=-1, keepdims=True)
  r = jnp.where(tot > 0, r / jnp.where(tot > 0, tot, 1.0), 1.0 / kh)
  a = jnp.round(r * num_heads).astype(jnp.int32)
  flat = a.reshape(-1, kh)

  def repair(a):
    def down(a):
      return a.at[jnp.argmax(a)].add(-1)

    def up(a):
      return a.at[jnp.argmin(a)].add(1)

    a = jax.lax.while_loop(lambda a: jnp.sum(a) > num_heads, down, a)
    return jax.lax.while_loop(lambda a: jnp.sum(a) < num_heads, up, a)

  return jax.vmap(repair)(flat).reshape(a.shape)


def key_driven_head_groups(allocation, num_heads: int):
  """Key/value head of every query head [..., N] for an allocation [..., K]
  (contiguous groups)."""
  ends = jnp.cumsum(allocation, axis=-1)                       # [..., K]
  h = jnp.arange(num_heads)
  return jnp.sum(h[..., :, None] >= ends[..., None, :], axis=-1).astype(
      jnp.int32)


def _alive_columns(mask, is_causal, b, n, t, s):
  """[B, S] bool: key slots some query may attend (None: all)."""
  alive = None
  if mask is not None:
    m = jnp.asarray(mask)
    m4 = m.reshape((1,) * (4 - m.ndim) + m.shape)
    alive = jnp.broadcast_to(jnp.any(m4, axis=(1, 2)), (b, s))
  if is_causal and s > t:
    c = jnp.broadcast_to(jnp.arange(s) < t, (b, s))
    alive = c if alive is None else alive & c
  return alive


def _xla_backend(config, query, key, value, groups, kwargs):
  del config
  b, s = key.shape[:2]
  if groups.ndim == 1:
    kx, vx = key[:, :, groups], value[:, :, groups]
  else:                                           # [B, N]
    idx = groups[:, None, :, None]
    kx = jnp.take_along_axis(key, idx, axis=2)
    vx = jnp.take_along_axis(value, idx, axis=2)
  if query.dtype != jnp.float32:
    # Low-precision inputs are attended in float32: XLA:CPU fails to run the
    # bf16 x bf16 -> f32 dot it emits after the per-example gather
    # ("Unsupported element type for DotThunk"); outputs keep query.dtype.
    f = jnp.float32
    return dot_product_attention(query.astype(f), kx.astype(f), vx.astype(f),
                                 **kwargs).astype(query.dtype)
  return dot_product_attention(query, kx, vx, **kwargs)


_OP.register("xla", _xla_backend)


def _prepare(query, key, value, mask, is_causal, norms, minmax, group_over):
  if group_over not in ("batch", "example"):
    raise ValueError(f"`group_over` must be 'batch' or 'example', got "
                     f"{group_over!r}.")
  query, key, value, dims, unbatched = _common.prepare_qkv(query, key, value)
  b, t, n, s, kh, h, hv = dims
  if mask is not None:
    mask = jnp.asarray(mask)
    if unbatched and mask.ndim == 4:
      raise ValueError(f"`mask` of rank 4 given with unbatched inputs: shape "
                       f"{mask.shape}.")
    if mask.dtype != jnp.bool_ or mask.ndim > 4:
      raise ValueError(f"`mask` must be boolean with rank <= 4, got "
                       f"{mask.dtype} {mask.shape}.")
    _common.check_broadcastable("mask", mask, (b, n, t, s))
  alive = _alive_columns(mask, is_causal, b, n, t, s)
  if norms is None:
    norms = key_head_norms(key, alive, group_over=group_over)
  else:
    norms = jnp.asarray(norms)
    want = (kh,) if group_over == "batch" else (b, kh)
    if tuple(norms.shape) != want:
      raise ValueError(f"`norms` must have shape {list(want)} (group_over="
                       f"{group_over!r}), got {tuple(norms.shape)}.")
  alloc = allocate_query_heads(norms, n, minmax=minmax)
  return query, key, value, mask, alloc, dims, unbatched


def key_driven_gqa(query, key, value, bias=None, mask=None, *,
                   is_causal: bool = False, norms=None, minmax: bool = True,
                   group_over: str = "batch", return_allocation: bool = False,
                   implementation=None, attention_implementation=None,
                   **kwargs):
  """Key-driven GQA (KDGQA; DGQA with `norms=`).

  Args:
    query: [B, T, N, H] (or [T, N, H]); key: [B, S, K, H]; value:
      [B, S, K, Hv]; N % K == 0 as for GQA (the allocation itself may be
      uneven).
    bias, mask, is_causal, **kwargs: as `dot_product_attention`.
    norms: key-head statistic to allocate from ([K], or [B, K] with
      group_over="example"); default: this call's key norms.
    minmax: min-max scale the norms first (KDGQA; DGQA uses False).
    group_over: "batch" (paper) or "example".
    return_allocation: also return the int allocation [K] / [B, K].
    implementation: dispatch of op "key_driven_gqa" (only "xla");
      attention_implementation: passed to dot_product_attention.

  Returns:
    [B, T, N, Hv] in query.dtype (and the allocation).
  """
  q, k, v, mask, alloc, dims, unbatched = _prepare(
      query, key, value, mask, is_causal, norms, minmax, group_over)
  n = dims[2]
  groups = key_driven_head_groups(alloc, n)
  kw = dict(kwargs, bias=bias, mask=mask, is_causal=is_causal,
            implementation=attention_implementation)
  out = _OP(implementation, q, k, v, groups, kw)
  if unbatched:
    out = out[0]
  return (out, alloc) if return_allocation else out


def _np_allocation(norms, num_heads, minmax):
  """The authors' loop, in NumPy (reference)."""
  norms = np.asarray(norms, np.float64)
  if minmax:
    span = norms.max() - norms.min()
    norms = (norms - norms.min()) / span if span > 0 else np.ones_like(norms)
  r = norms / norms.sum() if norms.sum() > 0 else np.full(len(norms),
                                                          1 / len(norms))
  a = np.round(r * num_heads).astype(int)
  while a.sum() > num_heads:
    a[np.argmax(a)] -= 1
  while a.sum() < num_heads:
    a[np.argmin(a)] += 1
  return a


def key_driven_gqa_reference(query, key, value, *, mask=None,
                             is_causal: bool = False, norms=None,
                             minmax: bool = True, group_over: str = "batch"):
  """Concrete-input reference: the allocation by the authors' NumPy loop,
  then an explicit per-head softmax (no jit)."""
  q, k, v, mask, _, dims, unbatched = _prepare(
      query, key, value, mask, is_causal, norms, minmax, group_over)
  b, t, n, s, kh, h, hv = dims
  alive = _alive_columns(mask, is_causal, b, n, t, s)
  kz = _common.zero_masked(k, alive).astype(jnp.float32)
  vz = _common.zero_masked(v, alive).astype(jnp.float32)
  if norms is None:
    # (stop_gradient: under an eager jax.grad the primal is concrete)
    nrm = np.sqrt(np.sum(np.square(np.asarray(jax.lax.stop_gradient(kz),
                                              np.float64)), axis=(1, 3)))
    norms = nrm.sum(0) if group_over == "batch" else nrm
  norms = np.asarray(norms)
  allocs = ([_np_allocation(norms, n, minmax)] * b if group_over == "batch"
            else [_np_allocation(x, n, minmax) for x in norms])
  ok = jnp.ones((b, n, t, s), bool)
  if mask is not None:
    ok = ok & mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
  if is_causal:
    ok = ok & (jnp.arange(s)[None, :] <= jnp.arange(t)[:, None])
  outs = []
  for bi in range(b):
    heads = np.repeat(np.arange(kh), allocs[bi])
    logits = jnp.einsum("tnh,snh->nts", q[bi].astype(jnp.float32),
                        kz[bi][:, heads]) / np.sqrt(h)
    p = _common.masked_softmax(logits, ok[bi], axis=-1)
    outs.append(jnp.einsum("nts,snd->tnd", p, vz[bi][:, heads]))
  out = jnp.stack(outs).astype(query.dtype)
  return out[0] if unbatched else out


class KeyDrivenGQAttention(MultiHeadAttention):
  """MultiHeadAttention (with num_kv_heads < num_heads) whose query heads are
  grouped by `key_driven_gqa` at every call (KDGQA). `minmax`, `group_over`
  fixed at construction."""

  def __init__(self, num_heads: int, in_features: int, *args,
               minmax: bool = True, group_over: str = "batch", **kwargs):
    import functools  # pylint: disable=import-outside-toplevel
    fn = functools.partial(key_driven_gqa, minmax=minmax,
                           group_over=group_over)
    super().__init__(num_heads, in_features, *args, attention_fn=fn, **kwargs)
