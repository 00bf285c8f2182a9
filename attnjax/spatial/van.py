"""Visual Attention Network large-kernel attention (Guo et al. 2022, "Visual
Attention Network").

LKA decomposes a large `K x K` convolution into a depthwise conv, a dilated
depthwise conv and a 1x1 conv, and uses the result as an attention map that
multiplies the input element-wise:

    attn = PW(DWD_d(DW(x)));   out = attn * x

(VAN: DW 5x5, DWD 7x7 with dilation 3, i.e. a 21x21 receptive field.) All
convolutions are 'same' with zero padding. There are no keys, so no masks;
cost is linear in pixels.

`large_kernel_attention(x, dw_kernel, dw_bias, dwd_kernel, dwd_bias,
pw_kernel, pw_bias, *, dilation=3)` on x [B, H, W, C]; `LargeKernelAttention`
is VAN's LKA unit, `VANAttention` VAN's attention block (proj_1, GELU, LKA,
proj_2, + shortcut).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax._dispatch import Op
from attnjax.spatial._common import check_channels_last, check_floating
from attnjax.spatial._dwconv import (depthwise_conv2d,
                                     depthwise_conv2d_reference)

__all__ = ["large_kernel_attention", "large_kernel_attention_reference",
           "LargeKernelAttention", "VANAttention", "LARGE_KERNEL_ATTENTION"]

LARGE_KERNEL_ATTENTION = Op("spatial.large_kernel_attention")


def _check(x, dw_kernel, dw_bias, dwd_kernel, dwd_bias, pw_kernel, pw_bias,
           dilation):
  check_floating("x", x)
  if x.ndim != 4:
    raise ValueError(f"`x` must be [batch, H, W, C] (channels last), got "
                     f"shape {tuple(x.shape)}.")
  c = x.shape[-1]
  for name, k in (("dw_kernel", dw_kernel), ("dwd_kernel", dwd_kernel)):
    if k.ndim != 3 or k.shape[2] != c or k.shape[0] % 2 == 0 or k.shape[1] % 2 == 0:
      raise ValueError(f"`{name}` must be [kh, kw, C={c}] with odd kh, kw, got "
                       f"{tuple(k.shape)} (x {tuple(x.shape)}).")
  if tuple(pw_kernel.shape) != (c, c):
    raise ValueError(f"`pw_kernel` must be [C, C]=({c}, {c}), got "
                     f"{tuple(pw_kernel.shape)}.")
  for name, bb in (("dw_bias", dw_bias), ("dwd_bias", dwd_bias),
                   ("pw_bias", pw_bias)):
    if bb is not None and tuple(bb.shape) != (c,):
      raise ValueError(f"`{name}` must be [C]=({c},), got {tuple(bb.shape)}.")
  if not isinstance(dilation, int) or isinstance(dilation, bool) or dilation < 1:
    raise ValueError(f"`dilation` must be an int >= 1, got {dilation!r}.")


def _xla(config, x, dw_kernel, dw_bias, dwd_kernel, dwd_bias, pw_kernel,
         pw_bias, *, dilation):
  del config
  a = depthwise_conv2d(x, dw_kernel, dw_bias)
  a = depthwise_conv2d(a.astype(x.dtype), dwd_kernel, dwd_bias,
                       dilation=dilation)
  a = jnp.einsum("bhwc,cd->bhwd", a.astype(x.dtype), pw_kernel.astype(x.dtype),
                 preferred_element_type=jnp.float32)
  if pw_bias is not None:
    a = a + pw_bias.astype(jnp.float32)
  return (a * x.astype(jnp.float32)).astype(x.dtype)


LARGE_KERNEL_ATTENTION.register("xla", _xla)


def large_kernel_attention(x, dw_kernel, dw_bias, dwd_kernel, dwd_bias,
                           pw_kernel, pw_bias, *, dilation: int = 3,
                           implementation=None):
  """VAN LKA: `PW(DWD_dilation(DW(x))) * x`.

  Args:
    x: [B, H, W, C].
    dw_kernel: [k1, k1, C] depthwise; dw_bias [C] or None.
    dwd_kernel: [k2, k2, C] dilated depthwise; dwd_bias [C] or None.
    pw_kernel: [C_in, C_out] 1x1 conv; pw_bias [C] or None.
    implementation: dispatch (`LARGE_KERNEL_ATTENTION`: 'xla').
  Returns: [B, H, W, C] in x.dtype.
  """
  _check(x, dw_kernel, dw_bias, dwd_kernel, dwd_bias, pw_kernel, pw_bias,
         dilation)
  return LARGE_KERNEL_ATTENTION(implementation, x, dw_kernel, dw_bias,
                                dwd_kernel, dwd_bias, pw_kernel, pw_bias,
                                dilation=dilation)


def large_kernel_attention_reference(x, dw_kernel, dw_bias, dwd_kernel,
                                     dwd_bias, pw_kernel, pw_bias, *,
                                     dilation: int = 3):
  """Plain jnp: the convolutions as sums of shifted maps, float32."""
  _check(x, dw_kernel, dw_bias, dwd_kernel, dwd_bias, pw_kernel, pw_bias,
         dilation)
  a = depthwise_conv2d_reference(x, dw_kernel, dw_bias)
  a = depthwise_conv2d_reference(a, dwd_kernel, dwd_bias, dilation=dilation)
  a = a @ pw_kernel.astype(jnp.float32)
  if pw_bias is not None:
    a = a + pw_bias.astype(jnp.float32)
  return (a * x.astype(jnp.float32)).astype(x.dtype)


def _dw_param(rngs, k, c, param_dtype):
  bound = 1.0 / k          # torch Conv2d default: U(+-1/sqrt(fan_in)), fan_in = k*k
  return (nnx.Param(jax.random.uniform(rngs.params(), (k, k, c), param_dtype,
                                       -bound, bound)),
          nnx.Param(jax.random.uniform(rngs.params(), (c,), param_dtype,
                                       -bound, bound)))


class LargeKernelAttention(nnx.Module):
  """VAN's LKA unit on [B, H, W, C]: `conv0` depthwise `dw_size` (5),
  `conv_spatial` depthwise `dwd_size` (7) with `dilation` (3), `conv1` 1x1
  (Linear(C, C)); returns `attn * x`."""

  def __init__(self, dim: int, *, dw_size: int = 5, dwd_size: int = 7,
               dilation: int = 3, dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.dim, self.dilation = dim, dilation
    self.conv0_kernel, self.conv0_bias = _dw_param(rngs, dw_size, dim,
                                                   param_dtype)
    self.conv_spatial_kernel, self.conv_spatial_bias = _dw_param(
        rngs, dwd_size, dim, param_dtype)
    self.conv1 = nnx.Linear(dim, dim, dtype=dtype, param_dtype=param_dtype,
                            rngs=rngs)

  def __call__(self, x):
    check_channels_last(x, self.dim, 2)
    return large_kernel_attention(
        x, self.conv0_kernel[...], self.conv0_bias[...],
        self.conv_spatial_kernel[...], self.conv_spatial_bias[...],
        self.conv1.kernel[...], self.conv1.bias[...], dilation=self.dilation)


class VANAttention(nnx.Module):
  """VAN's Attention block: `proj_2(LKA(GELU(proj_1(x)))) + x` (1x1 convs as
  Linear(C, C))."""

  def __init__(self, dim: int, *, dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs, **lka_kwargs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.proj_1 = nnx.Linear(dim, dim, **kw)
    self.spatial_gating_unit = LargeKernelAttention(dim, **lka_kwargs, **kw)
    self.proj_2 = nnx.Linear(dim, dim, **kw)

  def __call__(self, x):
    y = jax.nn.gelu(self.proj_1(x), approximate=False)
    return self.proj_2(self.spatial_gating_unit(y)) + x
