"""Triplet attention (Misra et al. 2021, "Rotate to Attend: Convolutional
Triplet Attention Module").

Three branches capture the (C, W), (C, H) and (H, W) interactions: each
reduces the remaining dim with Z-pool (concatenated max and mean), applies a
`k x k` conv (2 -> 1 channels; BatchNorm folded into its affine `scale`,
`bias` at inference) and a sigmoid, and rescales the input; the output is
the mean of the three:

    branch_CW: a = sigmoid(conv(Zpool_H(x)) [C, W]),  x * a[None]
    branch_CH: a = sigmoid(conv(Zpool_W(x)) [C, H]),  x * a[:, None]
    branch_HW: a = sigmoid(conv(Zpool_C(x)) [H, W]),  x * a[..., None]

(the conv's spatial axes are the two interacting dims, in that order: C is
the first axis of the CW and CH maps, as in the official rotations up to a
transpose of the kernel). No keys, no masks.

`triplet_attention(x, kernels, scales, biases)` on [B, H, W, C] with
`kernels` [3, k, k, 2] (branch order CW, CH, HW; input channels (max,
mean)), `scales`/`biases` [3]. `TripletAttention` is the module (conv without
bias + BatchNorm per branch).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax._dispatch import Op
from attnjax.spatial._common import check_floating

__all__ = ["triplet_attention", "triplet_attention_reference",
           "TripletAttention", "TRIPLET_ATTENTION"]

TRIPLET_ATTENTION = Op("spatial.triplet_attention")

# (axis reduced by Z-pool, axes of the 2D map in conv order) on [B, H, W, C]
_BRANCHES = ((1, (3, 2)), (2, (3, 1)), (3, (1, 2)))


def _check(x, kernels, scales, biases):
  check_floating("x", x)
  if x.ndim != 4:
    raise ValueError(f"`x` must be [B, H, W, C], got {tuple(x.shape)}.")
  if kernels.ndim != 4 or kernels.shape[0] != 3 or kernels.shape[3] != 2 or (
      kernels.shape[1] % 2 == 0 or kernels.shape[1] != kernels.shape[2]):
    raise ValueError(f"`kernels` must be [3, k, k, 2] with odd k, got "
                     f"{tuple(kernels.shape)}.")
  for name, a in (("scales", scales), ("biases", biases)):
    if tuple(a.shape) != (3,):
      raise ValueError(f"`{name}` must have shape (3,), got {tuple(a.shape)}.")


def _zpool_map(x, red, axes):
  """[B, A0, A1, 2] (max, mean) with A0, A1 the map axes, float32."""
  xf = x.astype(jnp.float32)
  z = jnp.stack([xf.max(red), xf.mean(red)], -1)     # drop `red`
  rest = [a for a in (1, 2, 3) if a != red]          # their order in z
  perm = [0] + [1 + rest.index(a) for a in axes] + [3]
  return z.transpose(perm)


def _expand(a, red, axes):
  """Map [B, A0, A1] back to broadcast over [B, H, W, C]."""
  rest = sorted(axes)
  a = a if list(axes) == rest else jnp.swapaxes(a, 1, 2)
  return jnp.expand_dims(a, red)


def _xla(config, x, kernels, scales, biases):
  del config
  out = 0.0
  k = kernels.shape[1]
  for i, (red, axes) in enumerate(_BRANCHES):
    z = _zpool_map(x, red, axes)
    a = jax.lax.conv_general_dilated(
        z, kernels[i].astype(jnp.float32)[..., None], (1, 1),
        [(k // 2, k // 2)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    a = jax.nn.sigmoid(a[..., 0] * scales[i] + biases[i])
    out = out + x.astype(jnp.float32) * _expand(a, red, axes)
  return (out / 3.0).astype(x.dtype)


TRIPLET_ATTENTION.register("xla", _xla)


def triplet_attention(x, kernels, scales, biases, *, implementation=None):
  """Triplet attention on x [B, H, W, C]; returns x.dtype."""
  _check(x, kernels, scales, biases)
  return TRIPLET_ATTENTION(implementation, x, kernels, scales, biases)


def triplet_attention_reference(x, kernels, scales, biases):
  """Plain jnp: the 2 -> 1 convs as sums of shifted zero-padded maps."""
  _check(x, kernels, scales, biases)
  xf = x.astype(jnp.float32)
  k = kernels.shape[1]
  out = 0.0
  for i, (red, axes) in enumerate(_BRANCHES):
    z = _zpool_map(x, red, axes)
    a0, a1 = z.shape[1:3]
    zp = jnp.pad(z, [(0, 0), (k // 2,) * 2, (k // 2,) * 2, (0, 0)])
    conv = sum(jnp.einsum("bijc,c->bij", zp[:, di:di + a0, dj:dj + a1],
                          kernels[i, di, dj].astype(jnp.float32))
               for di in range(k) for dj in range(k))
    a = jax.nn.sigmoid(conv * scales[i] + biases[i])
    out = out + xf * _expand(a, red, axes)
  return (out / 3.0).astype(x.dtype)


class TripletAttention(nnx.Module):
  """Triplet attention module on [B, H, W, C]: per branch a `k x k` conv
  (2 -> 1, no bias) and BatchNorm(1) (eps 1e-5, momentum 0.01 as in the
  official code); BatchNorm is folded into the primitive's affine with the
  running statistics when `use_running_average`, batch statistics
  otherwise."""

  def __init__(self, kernel_size: int = 7, *, use_running_average: bool = True,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.kernel_size = kernel_size
    b = 1.0 / (2 * kernel_size * kernel_size) ** 0.5
    self.kernels = nnx.Param(jax.random.uniform(
        rngs.params(), (3, kernel_size, kernel_size, 2), param_dtype, -b, b))
    self.bn_scale = nnx.Param(jnp.ones((3,), param_dtype))
    self.bn_bias = nnx.Param(jnp.zeros((3,), param_dtype))
    self.bn_mean = nnx.BatchStat(jnp.zeros((3,), jnp.float32))
    self.bn_var = nnx.BatchStat(jnp.ones((3,), jnp.float32))
    self.use_running_average = use_running_average
    self.eps = 1e-5

  def __call__(self, x):
    if x.ndim != 4:
      raise ValueError(f"`x` must be [B, H, W, C], got {tuple(x.shape)}.")
    if self.use_running_average:
      mean, var = self.bn_mean[...], self.bn_var[...]
    else:   # batch statistics of each branch's conv output
      k = self.kernel_size
      stats = []
      for i, (red, axes) in enumerate(_BRANCHES):
        z = _zpool_map(x, red, axes)
        c = jax.lax.conv_general_dilated(
            z, self.kernels[i].astype(jnp.float32)[..., None], (1, 1),
            [(k // 2, k // 2)] * 2,
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        stats.append((c.mean(), c.var()))
      mean = jnp.stack([m for m, _ in stats])
      var = jnp.stack([v for _, v in stats])
    inv = self.bn_scale[...] / jnp.sqrt(var + self.eps)
    return triplet_attention(x, self.kernels[...], inv,
                             self.bn_bias[...] - mean * inv)
