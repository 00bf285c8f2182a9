"""CoaT factorized attention with convolutional relative position encoding
(Xu et al. 2021, "Co-Scale Conv-Attentional Image Transformers").

    out = scale * q (softmax_tokens(k)^T v) + q * DWConv(v)

The softmax normalizes each key channel over the tokens (not each query over
the keys), so `softmax(k)^T v` is a `[Hd, Hv]` context per head and the cost
is linear in pixels. The second term (CRPE) is the Hadamard product of the
query with a depthwise convolution of the value map (zero padding at the
borders): a relative position encoding with the conv's window.

`factorized_attention(q, k, v, *, crpe_kernel=None, crpe_bias=None,
key_mask=None)`: q/k/v `[B, *spatial, N, Hd]` (CRPE needs 2 spatial dims and
`Hv == Hd`); `crpe_kernel [kh, kw, N, Hd]` is one depthwise kernel per head
channel. CoaT gives heads different window sizes ({3: 2, 5: 3, 7: 3} heads);
`FactorizedAttention` stores them that way and zero-pads each to the largest
window, which is the same convolution.

`key_mask [B, *spatial]` (True = valid) removes keys from the token softmax
and zeroes their values, also inside the CRPE convolution (a masked value
counts as padding), so nothing a masked slot holds reaches the output. With
every key masked the attention term is 0 and the output is `q * crpe_bias`
(zeros without bias).
"""

from __future__ import annotations

from typing import Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnjax._dispatch import Op
from attnjax.spatial._common import HeadGated
from attnjax.spatial._common import (heads_and_scale, check_channels_last,
                                     check_spatial_qkv, default_scale,
                                     flatten_spatial, masked_softmax,
                                     repeat_kv)

__all__ = ["factorized_attention", "factorized_attention_reference",
           "FactorizedAttention", "FACTORIZED_ATTENTION"]

FACTORIZED_ATTENTION = Op("spatial.factorized_attention")


def _check(query, key, value, crpe_kernel, crpe_bias, key_mask):
  nd, n, _ = check_spatial_qkv(query, key, value, spatial_dims=(1, 2, 3))
  d = query.shape[-1]
  if crpe_kernel is not None:
    if nd != 2:
      raise ValueError(
          f"`crpe_kernel` needs 2 spatial dims, got query shape "
          f"{tuple(query.shape)}.")
    if value.shape[-1] != d:
      raise ValueError(
          f"CRPE multiplies q by conv(v): `value` head_dim must equal the "
          f"query's, got query {tuple(query.shape)}, value "
          f"{tuple(value.shape)}.")
    k_ = crpe_kernel.shape
    if (crpe_kernel.ndim != 4 or k_[2:] != (n, d) or k_[0] % 2 == 0
        or k_[1] % 2 == 0):
      raise ValueError(
          f"`crpe_kernel` must have shape [kh, kw, heads, head_dim] with odd "
          f"kh, kw and (heads, head_dim)=({n}, {d}), got {tuple(k_)}.")
  if crpe_bias is not None and tuple(crpe_bias.shape) != (n, d):
    raise ValueError(f"`crpe_bias` must have shape [heads, head_dim]=({n}, "
                     f"{d}), got {tuple(crpe_bias.shape)}.")
  if crpe_bias is not None and crpe_kernel is None:
    raise ValueError("`crpe_bias` given without `crpe_kernel`.")
  if key_mask is not None:
    want = tuple(query.shape[:1 + nd])
    if tuple(key_mask.shape) != want or key_mask.dtype != jnp.bool_:
      raise ValueError(f"`key_mask` must be bool [batch, *spatial]={want}, "
                       f"got {tuple(key_mask.shape)} {key_mask.dtype}.")
  return nd, n


def _depthwise(v, kernel):
  """v [B, H, W, N, D], kernel [kh, kw, N, D] -> same-size depthwise conv."""
  b, h, w, n, d = v.shape
  kh, kw = kernel.shape[:2]
  out = jax.lax.conv_general_dilated(
      v.reshape(b, h, w, n * d), kernel.reshape(kh, kw, 1, n * d).astype(
          v.dtype), (1, 1), [(kh // 2, kh // 2), (kw // 2, kw // 2)],
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=n * d,
      preferred_element_type=jnp.float32)
  return out.reshape(b, h, w, n, d)


def _xla(config, query, key, value, *, crpe_kernel, crpe_bias, key_mask,
         scale):
  del config
  n = query.shape[-2]
  if key_mask is not None:
    km = key_mask[..., None, None]
    key, value = jnp.where(km, key, 0), jnp.where(km, value, 0)
  k = flatten_spatial(key)
  ok = None if key_mask is None else key_mask.reshape(k.shape[0], -1, 1, 1)
  ks = masked_softmax(k, ok, axis=1)                   # over tokens, f32
  ctx = jnp.einsum("bskd,bske->bkde", ks.astype(value.dtype),
                   flatten_spatial(value), preferred_element_type=jnp.float32)
  ctx = repeat_kv(ctx.transpose(0, 2, 1, 3), n)        # [B, D, N, E]
  out = scale * jnp.einsum("b...nd,bdne->b...ne", query, ctx.astype(
      query.dtype), preferred_element_type=jnp.float32)
  if crpe_kernel is not None:
    conv = _depthwise(repeat_kv(value, n), crpe_kernel)
    if crpe_bias is not None:
      conv = conv + crpe_bias.astype(jnp.float32)
    out = out + query.astype(jnp.float32) * conv
  return out.astype(query.dtype)


FACTORIZED_ATTENTION.register("xla", _xla)


def factorized_attention(query, key, value, *, crpe_kernel=None,
                         crpe_bias=None, key_mask=None,
                         scale: Optional[float] = None, implementation=None):
  """CoaT factorized attention (+ convolutional relative position encoding).

  Args:
    query: [B, *spatial, N, Hd]; key/value [B, *spatial, K, Hd|Hv], N % K == 0.
    crpe_kernel: optional depthwise kernel [kh, kw, N, Hd] (odd sizes, 2D).
    crpe_bias: optional [N, Hd].
    key_mask: optional bool [B, *spatial], True = valid key.
    scale: multiplies the attention term (default 1/sqrt(Hd), CoaT's).
    implementation: dispatch (`FACTORIZED_ATTENTION`: 'xla').
  Returns: [B, *spatial, N, Hv] in query.dtype.
  """
  _check(query, key, value, crpe_kernel, crpe_bias, key_mask)
  return FACTORIZED_ATTENTION(
      implementation, query, key, value, crpe_kernel=crpe_kernel,
      crpe_bias=crpe_bias, key_mask=key_mask,
      scale=default_scale(scale, query.shape[-1]))


def factorized_attention_reference(query, key, value, *, crpe_kernel=None,
                                   crpe_bias=None, key_mask=None,
                                   scale: Optional[float] = None):
  """Plain jnp: the [S, S] matrix A[t, s] = q_t . softmax_tokens(k)_s, out =
  scale A v, and the CRPE convolution as a sum of shifted value maps."""
  nd, n = _check(query, key, value, crpe_kernel, crpe_bias, key_mask)
  scale = default_scale(scale, query.shape[-1])
  f32 = lambda x: x.astype(jnp.float32)
  q = f32(flatten_spatial(query))
  k = f32(flatten_spatial(repeat_kv(key, n)))
  v = f32(repeat_kv(value, n))
  valid = (jnp.ones(k.shape[:2], bool) if key_mask is None
           else key_mask.reshape(k.shape[0], -1))[..., None, None]
  e = jnp.where(valid, jnp.exp(jnp.where(valid, k, 0) - jnp.max(
      jnp.where(valid, k, -1e30), axis=1, keepdims=True)), 0)
  ksm = e / jnp.maximum(e.sum(1, keepdims=True), 1e-30)
  vm = jnp.where(valid, flatten_spatial(v), 0)
  a = jnp.einsum("btnd,bsnd->bnts", q, ksm)
  out = scale * jnp.einsum("bnts,bsne->btne", a, vm)
  out = out.reshape(query.shape[:-1] + (value.shape[-1],))
  if crpe_kernel is not None:
    vmap_ = vm.reshape(v.shape)
    kh, kw = crpe_kernel.shape[:2]
    h, w = v.shape[1:3]
    pad = jnp.pad(vmap_, [(0, 0), (kh // 2,) * 2, (kw // 2,) * 2, (0, 0),
                          (0, 0)])
    conv = sum(pad[:, i:i + h, j:j + w] * f32(crpe_kernel[i, j])
               for i in range(kh) for j in range(kw))
    if crpe_bias is not None:
      conv = conv + f32(crpe_bias)
    out = out + f32(query) * conv
  return out.astype(query.dtype)


class FactorizedAttention(HeadGated):
  """CoaT's FactorAttnConvRelPosEnc on [B, H, W, C] (image tokens; no class
  token): `qkv` Linear(dim, 3 dim, bias=qkv_bias), `proj` Linear(dim, dim),
  and CRPE depthwise convs `crpe_kernel_{k}` [k, k, heads_k * head_dim] +
  `crpe_bias_{k}` for the head split `windows` ({window: heads}, CoaT's
  default {3: 2, 5: 3, 7: 3}; heads in dict order). `windows=None` drops
  CRPE.
  """

  def __init__(self, dim: int, num_heads: int = 8, *,
               windows: Optional[Dict[int, int]] = None, use_crpe: bool = True,
               qkv_bias: bool = False, qk_scale: Optional[float] = None,
               dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.dim, self.num_heads = dim, num_heads
    self.head_dim, self.scale = heads_and_scale(dim, num_heads, qk_scale)
    self.qkv = nnx.Linear(dim, 3 * dim, use_bias=qkv_bias, dtype=dtype,
                          param_dtype=param_dtype, rngs=rngs)
    self.proj = nnx.Linear(dim, dim, dtype=dtype, param_dtype=param_dtype,
                           rngs=rngs)
    if use_crpe and windows is None:
      windows = {3: 2, 5: 3, 7: 3} if num_heads == 8 else {3: num_heads}
    if not use_crpe:
      windows = {}
    if windows and sum(windows.values()) != num_heads:
      raise ValueError(f"`windows` {windows} must split the {num_heads} heads.")
    if any(w % 2 == 0 or w < 1 for w in windows):
      raise ValueError(f"`windows` sizes must be odd, got {windows}.")
    self.windows = dict(windows)
    for w, h in self.windows.items():
      ch = h * self.head_dim
      bound = 1.0 / np.sqrt(w * w)       # torch Conv2d default (fan_in = k*k)
      setattr(self, f"crpe_kernel_{w}", nnx.Param(jax.random.uniform(
          rngs.params(), (w, w, ch), param_dtype, -bound, bound)))
      setattr(self, f"crpe_bias_{w}", nnx.Param(jax.random.uniform(
          rngs.params(), (ch,), param_dtype, -bound, bound)))

  def crpe(self):
    """(kernel [K, K, heads, head_dim], bias [heads, head_dim]) or (None,
    None): the per-window kernels zero-padded to the largest window K."""
    if not self.windows:
      return None, None
    big = max(self.windows)
    ks, bs = [], []
    for w, h in self.windows.items():
      p = (big - w) // 2
      k = jnp.pad(getattr(self, f"crpe_kernel_{w}")[...], [(p, p), (p, p),
                                                            (0, 0)])
      ks.append(k.reshape(big, big, h, self.head_dim))
      bs.append(getattr(self, f"crpe_bias_{w}")[...].reshape(h, self.head_dim))
    return jnp.concatenate(ks, 2), jnp.concatenate(bs, 0)

  def __call__(self, x, key_mask=None):
    check_channels_last(x, self.dim, 2)
    qkv = self.qkv(x).reshape(*x.shape[:-1], 3, self.num_heads, self.head_dim)
    kern, bias = self.crpe()
    out = factorized_attention(
        qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :],
        crpe_kernel=kern, crpe_bias=bias, key_mask=key_mask, scale=self.scale)
    return self.proj(self.gate_heads(out).reshape(x.shape))
