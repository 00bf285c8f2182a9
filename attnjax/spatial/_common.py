"""Helpers shared by the spatial attention family.

Spatial primitives take query/key/value `[batch, *spatial, heads, head_dim]`.
Everything here is plain jnp/numpy (plus `HeadGated`, the base of the layers
with per-head output gates); nothing imports a layer.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnjax._numerics import gate_heads
from attnjax._numerics import masked_softmax  # noqa: F401  (re-exported to the spatial modules)
from attnjax._checks import check_floating
# One definition, shared with the kernels (re-exported for the family).
from pallas_kernels._rules import default_scale  # noqa: F401


def _is_int(v) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def to_tuple(name: str, value, ndim: int, *, minimum: int = 1) -> Tuple[int, ...]:
  """int -> (int,) * ndim; a sequence must have length ndim. Validates >= min.

  Python and NumPy integers only: floats (even inside a tuple, e.g.
  (3.7, 3.7)) are refused rather than truncated.
  """
  if _is_int(value):
    out = (int(value),) * ndim
  else:
    try:
      items = tuple(value)
    except TypeError:
      raise ValueError(
          f"`{name}` must be an int or a tuple of {ndim} ints, got {value!r}."
      ) from None
    if not all(_is_int(v) for v in items):
      raise ValueError(
          f"`{name}` must be an int or a tuple of {ndim} ints, got {value!r} "
          "(non-integer entries are not truncated).")
    out = tuple(int(v) for v in items)
    if len(out) != ndim:
      raise ValueError(
          f"`{name}` must have one entry per spatial dim ({ndim}), got "
          f"{value!r}.")
  if any(v < minimum for v in out):
    raise ValueError(f"`{name}` entries must be >= {minimum}, got {value!r}.")
  return out


def to_bool_tuple(name: str, value, ndim: int) -> Tuple[bool, ...]:
  if isinstance(value, (bool, np.bool_)):
    return (bool(value),) * ndim
  try:
    out = tuple(bool(v) for v in value)
  except TypeError:
    raise ValueError(
        f"`{name}` must be a bool or a tuple of {ndim} bools, got {value!r}."
    ) from None
  if len(out) != ndim:
    raise ValueError(
        f"`{name}` must have one entry per spatial dim ({ndim}), got {value!r}.")
  return out


def check_spatial_qkv(query, key, value, *, spatial_dims=(1, 2, 3),
                      same_spatial: bool = True):
  """Validates [B, *spatial, N, H] inputs; returns (ndim_spatial, N, K).

  Key/value heads K must divide query heads N (grouped-query attention).
  """
  for n, x in (("query", query), ("key", key), ("value", value)):
    check_floating(n, x)
  ranks = tuple(d + 3 for d in spatial_dims)
  shapes = (f"query={tuple(query.shape)}, key={tuple(key.shape)}, "
            f"value={tuple(value.shape)}")
  if query.ndim not in ranks:
    raise ValueError(
        f"`query` must have shape [batch, *spatial, heads, head_dim] with "
        f"{spatial_dims} spatial dims (rank in {ranks}), got shapes {shapes}.")
  if not (query.ndim == key.ndim == value.ndim):
    raise ValueError(
        f"`query`, `key`, `value` must have the same rank, got shapes {shapes}.")
  if key.shape[:-1] != value.shape[:-1]:
    raise ValueError(
        f"`key` and `value` must agree in all but the last dim, got shapes "
        f"{shapes}.")
  if query.shape[0] != key.shape[0]:
    raise ValueError(f"batch sizes differ: shapes {shapes}.")
  if same_spatial and query.shape[1:-2] != key.shape[1:-2]:
    raise ValueError(
        f"`query` and `key` must have the same spatial shape, got shapes "
        f"{shapes}.")
  if query.shape[-1] != key.shape[-1]:
    raise ValueError(
        f"`query` and `key` head_dim differ, got shapes {shapes}.")
  n, kh = query.shape[-2], key.shape[-2]
  if kh == 0 or n % kh:
    raise ValueError(
        f"`query` heads ({n}) must be a multiple of `key`/`value` heads "
        f"({kh}), got shapes {shapes}.")
  return query.ndim - 3, n, kh


def repeat_kv(x, num_heads: int):
  """[..., K, H] -> [..., N, H] by repeating each kv head N // K times."""
  k = x.shape[-2]
  return x if k == num_heads else jnp.repeat(x, num_heads // k, axis=-2)


def heads_and_scale(dim: int, num_heads: int, qk_scale=None, *,
                    scale_dim: int = None) -> Tuple[int, float]:
  """A spatial layer's (head_dim, logit scale): checks `dim % num_heads == 0`
  (ValueError naming both) and returns dim // num_heads and
  `layer_scale(qk_scale, scale_dim ** -0.5)`, scale_dim defaulting to the
  head dim (BiFormer scales by the full width)."""
  if dim % num_heads:
    raise ValueError(
        f"`dim` ({dim}) must be divisible by `num_heads` ({num_heads}).")
  head_dim = dim // num_heads
  return head_dim, layer_scale(
      qk_scale, (head_dim if scale_dim is None else scale_dim) ** -0.5)


def layer_scale(qk_scale, default: float, name: str = "qk_scale") -> float:
  """A layer's logit scale: `default` when None, else the given finite real
  number (0.0 is honoured: uniform attention, not the default)."""
  if qk_scale is None:
    return float(default)
  if isinstance(qk_scale, (bool, np.bool_)) or not isinstance(
      qk_scale, (int, float, np.integer, np.floating)) or not math.isfinite(
          float(qk_scale)):
    raise ValueError(f"`{name}` must be None or a finite number, got "
                     f"{qk_scale!r}.")
  return float(qk_scale)


def check_channels_last(x, dim: int, spatial_dims: int, name: str = "x"):
  """Validates a layer input [batch, *spatial, dim] (channels last).

  Wrong rank or last dim raise ValueError naming the expected layout (a
  channels-first NCHW map gets a hint); a zero spatial size raises.
  """
  shape = tuple(x.shape)
  axes = ("H", "W") if spatial_dims == 2 else tuple(
      f"S{i}" for i in range(spatial_dims))
  want = f"[batch, {', '.join(axes)}, dim={dim}] (channels last)"
  if len(shape) != spatial_dims + 2 or shape[-1] != dim:
    hint = ""
    if len(shape) == spatial_dims + 2 and shape[1] == dim:
      hint = "; this looks channels-first (NCHW): move channels last"
    raise ValueError(f"`{name}` must have shape {want}, got {shape}{hint}.")
  if any(s == 0 for s in shape[1:-1]):
    raise ValueError(f"`{name}` has an empty spatial dim: shape {shape}, "
                     f"expected {want} with every spatial size >= 1.")




class HeadGated(nnx.Module):
  """Base of the spatial attention layers with per-head output gates.

  Same semantics as `attnjax.MultiHeadAttention.head_gate` (Michel, Levy &
  Neubig 2019; `attnjax.analysis.head_gates`): `head_gate` None (the class
  default: no gate, no cost) or a [num_heads] array / `nnx.Variable` that
  multiplies head h's output channels `[..., h, :]` right before the
  layer's output projection (or, for a layer without one, its output).
  `attnjax.analysis.gated_view` sets it on a view of a model; subclasses
  call `self.gate_heads(out)` on their per-head output [..., heads, d].
  """

  head_gate = None

  def gate_heads(self, out, heads: slice = slice(None)):
    """out [..., n, d] (the heads `heads` of this layer, in order) times
    their gates; unchanged when `head_gate` is None."""
    return gate_heads(self.head_gate, self.num_heads, out, heads)


def dense_attention_reference(query, key, value, mask=None, bias=None, *,
                              scale: float):
  """Plain attention over flattened tokens: q [B, T, N, H], k/v [B, S, N, H].

  mask bool / bias float broadcastable to [B, N, T, S]. Softmax in float32,
  rows with nothing to attend to -> zeros. Materializes the [B, N, T, S]
  scores: this is the definition every spatial mechanism is tested against.
  """
  n = query.shape[-2]
  key, value = repeat_kv(key, n), repeat_kv(value, n)
  logits = jnp.einsum("btnh,bsnh->bnts", query.astype(jnp.float32),
                      key.astype(jnp.float32)) * scale
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  p = masked_softmax(logits, mask)
  out = jnp.einsum("bnts,bsnh->btnh", p, value.astype(jnp.float32))
  return out.astype(query.dtype)


def flatten_spatial(x):
  """[B, *spatial, N, H] -> [B, prod(spatial), N, H]."""
  return x.reshape(x.shape[0], -1, *x.shape[-2:])


def pad_to_multiple(x, multiples: Sequence[int], axes: Sequence[int]):
  """Zero-pads `axes` of x at the end up to a multiple of `multiples`."""
  pads = [(0, 0)] * x.ndim
  for m, a in zip(multiples, axes):
    pads[a] = (0, (-x.shape[a]) % m)
  if all(p == (0, 0) for p in pads):
    return x
  return jnp.pad(x, pads)


def partition_windows(x, window: Sequence[int]):
  """[B, *S, ...] (S divisible by window) -> [B, nW..., W..., ...].

  Axis order after: batch, window-grid dims, in-window dims, trailing dims.
  """
  nd = len(window)
  b, spatial, rest = x.shape[0], x.shape[1:1 + nd], x.shape[1 + nd:]
  shape = [b]
  for s, w in zip(spatial, window):
    shape += [s // w, w]
  x = x.reshape(*shape, *rest)
  perm = ([0] + [1 + 2 * i for i in range(nd)] + [2 + 2 * i for i in range(nd)]
          + list(range(1 + 2 * nd, x.ndim)))
  return x.transpose(perm)


def merge_windows(x, nd: int):
  """Inverse of partition_windows: [B, nW..., W..., ...] -> [B, *S, ...]."""
  b = x.shape[0]
  grid, win = x.shape[1:1 + nd], x.shape[1 + nd:1 + 2 * nd]
  rest = x.shape[1 + 2 * nd:]
  perm = [0]
  for i in range(nd):
    perm += [1 + i, 1 + nd + i]
  perm += list(range(1 + 2 * nd, x.ndim))
  x = x.transpose(perm)
  return x.reshape(b, *[g * w for g, w in zip(grid, win)], *rest)


def valid_mask(spatial_shape: Sequence[int], padded_shape: Sequence[int]):
  """numpy bool [*padded_shape]: True at positions inside spatial_shape."""
  m = np.ones(tuple(padded_shape), bool)
  for a, (s, p) in enumerate(zip(spatial_shape, padded_shape)):
    idx = [slice(None)] * len(padded_shape)
    idx[a] = slice(s, p)
    m[tuple(idx)] = False
  return m
