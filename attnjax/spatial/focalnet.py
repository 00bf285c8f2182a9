"""Focal Modulation (Yang et al. 2022, "Focal Modulation Networks").

Instead of query-key attention, each query is multiplied element-wise by a
modulator aggregated from hierarchical, gated context:

    ctx_0 = z;  ctx_l = GELU(DWConv_{k_l}(ctx_{l-1}))          l = 1..L
    ctx_global = GELU(mean_{H,W}(ctx_L))
    agg = sum_l gate_l * ctx_l + gate_{L+1} * ctx_global   (/ (L+1) when
                                                            normalize_modulator)
    out = q * (agg @ h_kernel + h_bias)

with `k_l = focal_factor * (l - 1) + focal_window` (FocalNet: 3, 5), depthwise
convs without bias, 'same' zero padding. There are no keys, so no masks;
cost is linear in pixels.

`focal_modulation(q, ctx, gates, focal_kernels, h_kernel, h_bias, *,
normalize_modulator=False)` on q/ctx [B, H, W, C], gates [B, H, W, L + 1];
`FocalModulation` is FocalNet's layer (`f` projection to q, ctx, gates; `h`
1x1 conv; `proj`).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax._dispatch import Op
from attnjax.spatial._common import check_channels_last, check_floating
from attnjax.spatial._dwconv import (depthwise_conv2d,
                                     depthwise_conv2d_reference)

__all__ = ["focal_modulation", "focal_modulation_reference",
           "FocalModulation", "FOCAL_MODULATION"]

FOCAL_MODULATION = Op("spatial.focal_modulation")


def _check(q, ctx, gates, focal_kernels, h_kernel, h_bias):
  for name, x in (("q", q), ("ctx", ctx), ("gates", gates)):
    check_floating(name, x)
  shapes = (f"q={tuple(q.shape)}, ctx={tuple(ctx.shape)}, "
            f"gates={tuple(gates.shape)}")
  if q.ndim != 4 or ctx.shape != q.shape:
    raise ValueError(f"`q` and `ctx` must be [B, H, W, C] of the same shape, "
                     f"got {shapes}.")
  levels = len(focal_kernels)
  if levels < 1:
    raise ValueError("`focal_kernels` must hold at least one kernel.")
  if tuple(gates.shape) != q.shape[:3] + (levels + 1,):
    raise ValueError(f"`gates` must be [B, H, W, levels + 1]="
                     f"{q.shape[:3] + (levels + 1,)}, got {shapes}.")
  c = q.shape[-1]
  for i, k in enumerate(focal_kernels):
    if k.ndim != 3 or k.shape[2] != c or k.shape[0] % 2 == 0 or k.shape[1] % 2 == 0:
      raise ValueError(f"`focal_kernels[{i}]` must be [k, k, C={c}] with odd "
                       f"k, got {tuple(k.shape)}.")
  if tuple(h_kernel.shape) != (c, c):
    raise ValueError(f"`h_kernel` must be [C, C]=({c}, {c}), got "
                     f"{tuple(h_kernel.shape)}.")
  if h_bias is not None and tuple(h_bias.shape) != (c,):
    raise ValueError(f"`h_bias` must be [C]=({c},), got {tuple(h_bias.shape)}.")


def _modulate(q, ctx, gates, focal_kernels, h_kernel, h_bias, normalize, conv):
  gelu = lambda x: jax.nn.gelu(x, approximate=False)
  levels = len(focal_kernels)
  c = ctx.astype(jnp.float32)
  g = gates.astype(jnp.float32)
  agg = 0.0
  for l, k in enumerate(focal_kernels):
    c = gelu(conv(c.astype(ctx.dtype), k))
    agg = agg + c * g[..., l:l + 1]
  glob = gelu(jnp.mean(c, axis=(1, 2), keepdims=True))
  agg = agg + glob * g[..., levels:]
  if normalize:
    agg = agg / (levels + 1)
  mod = jnp.einsum("bhwc,cd->bhwd", agg, h_kernel.astype(jnp.float32))
  if h_bias is not None:
    mod = mod + h_bias.astype(jnp.float32)
  return (q.astype(jnp.float32) * mod).astype(q.dtype)


def _xla(config, q, ctx, gates, focal_kernels, h_kernel, h_bias, *,
         normalize_modulator):
  del config
  return _modulate(q, ctx, gates, focal_kernels, h_kernel, h_bias,
                   normalize_modulator, depthwise_conv2d)


FOCAL_MODULATION.register("xla", _xla)


def focal_modulation(q, ctx, gates, focal_kernels: Sequence, h_kernel,
                     h_bias=None, *, normalize_modulator: bool = False,
                     implementation=None):
  """FocalNet focal modulation.

  Args:
    q, ctx: [B, H, W, C] (query and context projections).
    gates: [B, H, W, L + 1].
    focal_kernels: L depthwise kernels [k_l, k_l, C] (odd k_l).
    h_kernel: [C, C] 1x1 conv; h_bias [C] or None.
    normalize_modulator: divide the aggregate by L + 1.
    implementation: dispatch (`FOCAL_MODULATION`: 'xla').
  Returns: [B, H, W, C] in q.dtype.
  """
  focal_kernels = tuple(focal_kernels)
  _check(q, ctx, gates, focal_kernels, h_kernel, h_bias)
  return FOCAL_MODULATION(implementation, q, ctx, gates, focal_kernels,
                          h_kernel, h_bias,
                          normalize_modulator=bool(normalize_modulator))


def focal_modulation_reference(q, ctx, gates, focal_kernels, h_kernel,
                               h_bias=None, *, normalize_modulator=False):
  """Plain jnp (convolutions as sums of shifted maps), float32."""
  focal_kernels = tuple(focal_kernels)
  _check(q, ctx, gates, focal_kernels, h_kernel, h_bias)
  conv = lambda x, k: depthwise_conv2d_reference(x, k)
  return _modulate(q, ctx, gates, focal_kernels, h_kernel, h_bias,
                   normalize_modulator, conv)


class FocalModulation(nnx.Module):
  """FocalNet's FocalModulation on [B, H, W, C]: `f` Linear(C, 2C + L + 1,
  bias), `focal_kernel_{l}` depthwise [k_l, k_l, C] (no bias), `h` 1x1 conv
  Linear(C, C), `proj` Linear(C, C); k_l = focal_factor * l + focal_window."""

  def __init__(self, dim: int, *, focal_window: int = 3, focal_level: int = 2,
               focal_factor: int = 2, bias: bool = True,
               normalize_modulator: bool = False, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    if focal_level < 1:
      raise ValueError(f"`focal_level` must be >= 1, got {focal_level}.")
    self.dim, self.focal_level = dim, focal_level
    self.normalize_modulator = normalize_modulator
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.f = nnx.Linear(dim, 2 * dim + focal_level + 1, use_bias=bias, **kw)
    self.h = nnx.Linear(dim, dim, **kw)
    self.proj = nnx.Linear(dim, dim, **kw)
    self.kernel_sizes = tuple(focal_factor * l + focal_window
                              for l in range(focal_level))
    for l, k in enumerate(self.kernel_sizes):
      if k % 2 == 0:
        raise ValueError(f"focal kernel size {k} (level {l}) must be odd.")
      b = 1.0 / k
      setattr(self, f"focal_kernel_{l}", nnx.Param(jax.random.uniform(
          rngs.params(), (k, k, dim), param_dtype, -b, b)))

  def focal_kernels(self):
    return tuple(getattr(self, f"focal_kernel_{l}")[...]
                 for l in range(self.focal_level))

  def __call__(self, x):
    check_channels_last(x, self.dim, 2)
    z = self.f(x)
    c = self.dim
    out = focal_modulation(z[..., :c], z[..., c:2 * c], z[..., 2 * c:],
                           self.focal_kernels(), self.h.kernel[...],
                           self.h.bias[...],
                           normalize_modulator=self.normalize_modulator)
    return self.proj(out)
