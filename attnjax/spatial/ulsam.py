"""ULSAM (Saini et al. 2020, "ULSAM: Ultra-Lightweight Subspace Attention
Module for Compact Convolutional Neural Networks").

The channels are split into `G` subspaces; each learns ONE spatial attention
map with a softmax over all pixels:

    a_g = softmax_{pixels}(PW_g(maxpool3x3(DW_g(x_g))))      [B, H, W]
    out_g = a_g * x_g + x_g

(DW: per-channel 1x1 scale + bias; maxpool 3x3, stride 1, padding 1 (padding
never wins the max); PW: C/G -> 1 with bias). `mask [B, H, W]` (True =
valid) restricts the softmax to valid pixels; masked pixels get weight 0
(their output is x) and whatever they hold never reaches the other pixels'
output (their values are zeroed before the pooling, whose window then uses
the valid neighbours only). A fully masked image returns x.

`ulsam(x, dw_scale, dw_bias, pw_kernel, pw_bias, num_groups, *, mask=None)`
on [B, H, W, C] with `dw_*` [C], `pw_kernel` [C] (group g's C/G weights),
`pw_bias` [G]. `ULSAM` is the module.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnjax._dispatch import Op
from attnjax._numerics import NEG, masked_softmax
from attnjax.spatial._common import check_channels_last, check_floating

__all__ = ["ulsam", "ulsam_reference", "ULSAM", "ULSAM_OP"]

ULSAM_OP = Op("spatial.ulsam")


def _check(x, dw_scale, dw_bias, pw_kernel, pw_bias, num_groups, mask):
  check_floating("x", x)
  if x.ndim != 4:
    raise ValueError(f"`x` must be [B, H, W, C], got {tuple(x.shape)}.")
  c = x.shape[-1]
  if not isinstance(num_groups, int) or num_groups < 1 or c % num_groups:
    raise ValueError(f"`num_groups` ({num_groups!r}) must divide C={c}.")
  for name, a, want in (("dw_scale", dw_scale, (c,)), ("dw_bias", dw_bias, (c,)),
                        ("pw_kernel", pw_kernel, (c,)),
                        ("pw_bias", pw_bias, (num_groups,))):
    if tuple(a.shape) != want:
      raise ValueError(f"`{name}` must have shape {want}, got "
                       f"{tuple(a.shape)}.")
  if mask is not None and (tuple(mask.shape) != x.shape[:3]
                           or mask.dtype != jnp.bool_):
    raise ValueError(f"`mask` must be bool [B, H, W]={x.shape[:3]}, got "
                     f"{tuple(mask.shape)} {mask.dtype}.")


def _maxpool_xla(y):
  return jax.lax.reduce_window(y, -jnp.inf, jax.lax.max, (1, 3, 3, 1),
                               (1, 1, 1, 1), [(0, 0), (1, 1), (1, 1), (0, 0)])


def _maxpool_ref(y):
  h, w = y.shape[1:3]
  yp = jnp.pad(y, [(0, 0), (1, 1), (1, 1), (0, 0)], constant_values=NEG)
  return jnp.max(jnp.stack([yp[:, i:i + h, j:j + w] for i in range(3)
                            for j in range(3)]), 0)


def _ulsam(x, dw_scale, dw_bias, pw_kernel, pw_bias, g, mask, pool):
  b, h, w, c = x.shape
  xf = x.astype(jnp.float32)
  if mask is not None:
    xf = jnp.where(mask[..., None], xf, 0.0)
  y = xf * dw_scale.astype(jnp.float32) + dw_bias.astype(jnp.float32)
  if mask is not None:                  # masked pixels never win the max
    y = jnp.where(mask[..., None], y, NEG)
  y = pool(y)
  if mask is not None:
    y = jnp.where(mask[..., None], y, 0.0)
  logits = jnp.einsum("bhwgc,gc->bghw", y.reshape(b, h, w, g, c // g),
                      pw_kernel.astype(jnp.float32).reshape(g, c // g))
  logits = logits + pw_bias.astype(jnp.float32)[None, :, None, None]
  ok = None if mask is None else mask.reshape(b, 1, h * w)
  a = masked_softmax(logits.reshape(b, g, h * w), ok).reshape(b, g, h, w)
  a = jnp.repeat(jnp.moveaxis(a, 1, -1), c // g, axis=-1)       # [B,H,W,C]
  out = a * xf + x.astype(jnp.float32)
  return out.astype(x.dtype)


def _xla(config, x, dw_scale, dw_bias, pw_kernel, pw_bias, *, num_groups,
         mask):
  del config
  return _ulsam(x, dw_scale, dw_bias, pw_kernel, pw_bias, num_groups, mask,
                _maxpool_xla)


ULSAM_OP.register("xla", _xla)


def ulsam(x, dw_scale, dw_bias, pw_kernel, pw_bias, num_groups: int, *,
          mask=None, implementation=None):
  """ULSAM on x [B, H, W, C]; returns x.dtype (see module docstring)."""
  _check(x, dw_scale, dw_bias, pw_kernel, pw_bias, num_groups, mask)
  return ULSAM_OP(implementation, x, dw_scale, dw_bias, pw_kernel, pw_bias,
                  num_groups=num_groups, mask=mask)


def ulsam_reference(x, dw_scale, dw_bias, pw_kernel, pw_bias, num_groups: int,
                    *, mask=None):
  """Plain jnp (max pool as a max over 9 shifted maps), float32."""
  _check(x, dw_scale, dw_bias, pw_kernel, pw_bias, num_groups, mask)
  return _ulsam(x, dw_scale, dw_bias, pw_kernel, pw_bias, num_groups, mask,
                _maxpool_ref)


class ULSAM(nnx.Module):
  """ULSAM module on [B, H, W, C] with `num_groups` subspaces: per channel a
  depthwise 1x1 conv (scale, bias), per subspace a pointwise conv C/G -> 1
  (weights, bias)."""

  def __init__(self, dim: int, num_groups: int = 4, *,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    if dim % num_groups:
      raise ValueError(f"`num_groups` ({num_groups}) must divide `dim` "
                       f"({dim}).")
    self.dim, self.num_groups = dim, num_groups
    u = lambda shape, b: nnx.Param(jax.random.uniform(
        rngs.params(), shape, param_dtype, -b, b))
    self.dw_scale, self.dw_bias = u((dim,), 1.0), u((dim,), 1.0)
    b = 1.0 / np.sqrt(dim // num_groups)
    self.pw_kernel, self.pw_bias = u((dim,), b), u((num_groups,), b)

  def __call__(self, x, mask=None):
    check_channels_last(x, self.dim, 2)
    return ulsam(x, self.dw_scale[...], self.dw_bias[...], self.pw_kernel[...],
                 self.pw_bias[...], self.num_groups, mask=mask)
