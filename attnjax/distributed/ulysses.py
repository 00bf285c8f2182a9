"""Ulysses-style sequence parallelism: all-to-all from sequence to heads.

DeepSpeed-Ulysses (Jacobs et al. 2023): activations arrive sharded over the
sequence, [B, T/P, N, H] per device. One `all_to_all` per tensor re-shards
q, k and v over heads, [B, T, N/P, H], so each device holds whole sequences
for N/P heads and runs ordinary single-device attention on them (any attnjax
backend: 'chunked' keeps memory linear in T, causal masks and windows work
unchanged, and there is no causal load imbalance). A second `all_to_all`
brings the output back to sequence sharding.

Needs N % P == 0. With GQA (K kv heads, K % P != 0) the kv heads are repeated
by the smallest factor r with K*r % P == 0 before the exchange, which sends
r times more key/value data.

Backward: plain autodiff through `shard_map` (the transpose of an all_to_all
is the reverse all_to_all; the local attention brings its own memory-efficient
custom_vjp when implementation='chunked'), so no custom rule is needed.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec

from attnjax._checks import check_qkv, check_segment_ids
from attnjax.distributed._compat import (axis_size, check_batch_axis, place,
                                        shard_map)
from attnjax.softmax import dot_product_attention


def _kv_repeat(n: int, k: int, p: int) -> int:
  """Smallest r with (k*r) % p == 0 and n % (k*r) == 0 (kv heads repeated)."""
  for r in range(1, n // k + 1):
    if (k * r) % p == 0 and n % (k * r) == 0:
      return r
  raise ValueError(f"no kv-head repeat makes {k} kv heads divisible by {p}.")


def _local(query, key, value, qseg=None, kvseg=None, *, axis_name,
           attention_kwargs):
  # [b, T/P, N, H] -> [b, T, N/P, H]
  a2a = functools.partial(lax.all_to_all, axis_name=axis_name, split_axis=2,
                          concat_axis=1, tiled=True)
  q, k, v = a2a(query), a2a(key), a2a(value)
  # Segment ids arrive whole ([b, T], replicated over the sequence axis).
  out = dot_product_attention(q, k, v, q_segment_ids=qseg,
                              kv_segment_ids=kvseg, **attention_kwargs)
  # [b, T, N/P, Hv] -> [b, T/P, N, Hv]
  return lax.all_to_all(out, axis_name, split_axis=1, concat_axis=2,
                        tiled=True)


def ulysses_attention(query, key, value, *, mesh, axis_name: str,
                      is_causal: bool = False, scale: Optional[float] = None,
                      local_window_size=None,
                      implementation: Optional[str] = None,
                      batch_axis: Optional[str] = None, q_segment_ids=None,
                      kv_segment_ids=None):
  """Exact attention with the sequence sharded over `axis_name` (all-to-all).

  Args:
    query: [B, T, N, H] global array; N divisible by P = mesh.shape[axis_name].
    key, value: [B, S, K, H] / [B, S, K, Hv] with N % K == 0.
    mesh, axis_name: the mesh and the axis the sequence is sharded over; T and
      S must be divisible by P.
    is_causal, scale, local_window_size, implementation: passed to
      `attnjax.dot_product_attention` on the gathered sequences.
    batch_axis: optional mesh axis to shard the batch over as well.
    q_segment_ids, kv_segment_ids: optional int [B, T] / [B, S] (packed
      sequences); replicated over `axis_name` (they are small), so each
      device applies them to its whole gathered sequences.

  Returns:
    [B, T, N, Hv] in query.dtype, sharded like
    `PartitionSpec(batch_axis, axis_name)`. Differentiable by autodiff.
  """
  b, t, n, s, kh, h, hv = check_qkv(query, key, value, allow_unbatched=False)
  size = axis_size(mesh, axis_name, "axis_name")
  check_batch_axis(mesh, batch_axis, axis_name, b)
  if n % size:
    raise ValueError(
        f"ulysses_attention needs the number of query heads {n} to be "
        f"divisible by the size {size} of mesh axis {axis_name!r}; got "
        f"query={tuple(query.shape)}. Use ring_attention instead.")
  if t % size or s % size:
    raise ValueError(
        f"query length {t} and key length {s} must be divisible by the size "
        f"{size} of mesh axis {axis_name!r}; got query={tuple(query.shape)}, "
        f"key={tuple(key.shape)}.")
  r = _kv_repeat(n, kh, size)
  if r > 1:
    key = jnp.repeat(key, r, axis=2)
    value = jnp.repeat(value, r, axis=2)
  kwargs = dict(scale=scale if scale is None else float(scale),
                is_causal=bool(is_causal), local_window_size=local_window_size,
                implementation=implementation)
  if scale is None:
    kwargs["scale"] = 1.0 / math.sqrt(h)
  spec = PartitionSpec(batch_axis, axis_name, None, None)
  local = functools.partial(_local, axis_name=axis_name,
                            attention_kwargs=kwargs)
  qseg, kvseg = check_segment_ids(q_segment_ids, kv_segment_ids, b, t, s)
  segs = () if qseg is None else (qseg, kvseg)
  seg_spec = PartitionSpec(batch_axis, None)
  fn = shard_map(local, mesh=mesh,
                 in_specs=(spec,) * 3 + (seg_spec,) * len(segs),
                 out_specs=spec)
  return fn(*(place(x, mesh, spec) for x in (query, key, value)),
            *(place(x, mesh, seg_spec) for x in segs))


__all__ = ["ulysses_attention"]
