"""S2AFormer's Strip Self-Attention (SSA) and Hybrid Perception Block (HPB)
(Xu, Huang, Jia, Li, Gao, Qi, "S2AFormer: Strip Self-Attention for Efficient
Vision Transformer", arXiv 2505.22195, IEEE TIP 2025,
doi:10.1109/TIP.2025.3639919).

What the public sources define (no code has been released; the sources read
were the paper's abstract (arXiv v1/v2), the themoonlight.io review of the
paper, which quotes its HPB equations, and the emergentmind.com topic page
"Strip Self-Attention (SSA)", which paraphrases its Section III):

* SSA reduces the *spatial* size of K and V with a strided depth-wise
  convolution and compresses the *channels* of Q and K ("strips" of few
  channels) with 1x1 convolutions; the attention is the usual
  `softmax(Q' K'^T / sqrt(d')) V'` over the reduced tokens, so its cost is
  `N * (N / r^2) * (d_qk + d_v)` instead of `2 N^2 d`.
* HPB (the paper's Eq.):  f_conv = DWConv(x) + x;
  f_ssa = SSA(LN(f_conv)) + f_conv;  f_lim = LIM(LN(f_ssa)) + f_ssa;
  f_mlp = MLP(LN(f_lim)) + f_lim, with LIM the paper's Local Interaction
  Module.

What they do not give, so it is an argument here, with our default:

* `qk_dim` (compressed Q/K channels): default `dim // 4` (ours: a 4x
  compression of the logit computation; any multiple of `num_heads` works).
* the reduction conv's kernel/stride per stage: `sr_ratio` r (default 2,
  ours), kernel r x r with stride r (non-overlapping, as PVT/Twins' spatial
  reduction, made depth-wise as the paper says), followed by a LayerNorm
  (PVT's, ours); the map is zero-padded at the end to a multiple of r (as
  `GlobalSubsampledAttention`). PVT's per-stage schedule 8, 4, 2, 1 is the
  usual choice for a four-stage backbone.
* heads: an argument; the logit scale: `(qk_dim / heads) ** -0.5` (the
  standard 1 / sqrt(d) of the compressed key dim, ours).
* V: a Linear(dim, dim) of the reduced map; output projection
  Linear(dim, dim) (PVT's layout, ours).
* LIM: its internals are not described in the sources we could read, so
  `HybridPerceptionBlock` takes it as `local_module` (any module
  [B, H, W, C] -> [B, H, W, C]); with None that branch is omitted. The
  DWConv kernel (3) and MLP ratio (4) are ours.

The primitive `strip_self_attention(q, k, v)` is attention of the full
query map over the reduced key/value map (`twins.subsampled_attention`,
which takes a q/k head dim different from v's); `spatial_reduction` is the
strided depth-wise conv (`_dwconv.strided_depthwise_conv2d`).
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnjax._dispatch import Op
from attnjax.spatial._common import HeadGated
from attnjax.spatial._common import (check_channels_last, check_spatial_qkv,
                                     default_scale, dense_attention_reference,
                                     flatten_spatial, heads_and_scale,
                                     layer_scale)
from attnjax.spatial._dwconv import (depthwise_conv2d,
                                     strided_depthwise_conv2d,
                                     strided_depthwise_conv2d_reference)
from attnjax.spatial.twins import subsampled_attention

__all__ = ["strip_self_attention", "strip_self_attention_reference",
           "spatial_reduction", "spatial_reduction_reference",
           "StripSelfAttention", "HybridPerceptionBlock",
           "STRIP_SELF_ATTENTION"]

STRIP_SELF_ATTENTION = Op("spatial.strip_self_attention")


def _check(query, key, value, key_mask):
  check_spatial_qkv(query, key, value, same_spatial=False)
  if key_mask is not None:
    if tuple(key_mask.shape) != tuple(key.shape[:-2]):
      raise ValueError(
          f"`key_mask` must have shape [B, *reduced spatial]="
          f"{tuple(key.shape[:-2])}, got {tuple(key_mask.shape)} "
          f"(key {tuple(key.shape)}).")
    if key_mask.dtype != jnp.bool_:
      raise ValueError(f"`key_mask` must be bool, got {key_mask.dtype}.")


def _xla(config, query, key, value, *, key_mask, scale):
  del config
  return subsampled_attention(query, key, value, scale=scale,
                              key_mask=key_mask)


STRIP_SELF_ATTENTION.register("xla", _xla)


def strip_self_attention(query, key, value, *, key_mask=None,
                         scale: Optional[float] = None, implementation=None):
  """SSA: every query attends to all tokens of the spatially reduced map.

  Args:
    query: [B, *S, N, d_qk] (channel-compressed queries, the full map).
    key: [B, *S', K, d_qk] (channel-compressed keys of the reduced map);
      N % K == 0 (grouped-query heads allowed).
    value: [B, *S', K, d_v] (values of the reduced map, d_v may differ).
    key_mask: optional bool [B, *S'] (True = valid); masked keys never reach
      outputs or gradients; a query with no valid key returns zeros.
    scale: logit scale, default d_qk ** -0.5.
    implementation: dispatch (`STRIP_SELF_ATTENTION`: 'xla').
  Returns: [B, *S, N, d_v] in query.dtype.
  """
  _check(query, key, value, key_mask)
  return STRIP_SELF_ATTENTION(implementation, query, key, value,
                              key_mask=key_mask,
                              scale=default_scale(scale, query.shape[-1]))


def strip_self_attention_reference(query, key, value, *, key_mask=None,
                                   scale: Optional[float] = None):
  """Plain dense attention over the flattened reduced tokens (oracle)."""
  _check(query, key, value, key_mask)
  mask = None
  if key_mask is not None:
    mask = key_mask.reshape(key_mask.shape[0], 1, 1, -1)
  out = dense_attention_reference(
      flatten_spatial(query), flatten_spatial(key), flatten_spatial(value),
      mask, scale=default_scale(scale, query.shape[-1]))
  return out.reshape(query.shape[:-1] + value.shape[-1:])


def _check_reduction(x, kernel, bias, stride):
  if x.ndim != 4:
    raise ValueError(f"`x` must be [B, H, W, C], got {tuple(x.shape)}.")
  if kernel.ndim != 3 or kernel.shape[-1] != x.shape[-1]:
    raise ValueError(f"`kernel` must be [kh, kw, C={x.shape[-1]}], got "
                     f"{tuple(kernel.shape)} for x {tuple(x.shape)}.")
  if bias is not None and tuple(bias.shape) != (x.shape[-1],):
    raise ValueError(f"`bias` must be [C={x.shape[-1]}], got "
                     f"{tuple(bias.shape)}.")
  if not isinstance(stride, (int, np.integer)) or stride < 1:
    raise ValueError(f"`stride` must be an int >= 1, got {stride!r}.")


def spatial_reduction(x, kernel, bias=None, *, stride: int):
  """SSA's K/V spatial reduction: strided depth-wise conv of x [B, H, W, C]
  with kernel [kh, kw, C] -> [B, ceil(H / s), ceil(W / s), C] (end
  zero-padding), in x.dtype."""
  _check_reduction(x, kernel, bias, stride)
  return strided_depthwise_conv2d(x, kernel, bias,
                                  stride=int(stride)).astype(x.dtype)


def spatial_reduction_reference(x, kernel, bias=None, *, stride: int):
  """The same reduction as a sum of strided slices (plain jnp)."""
  _check_reduction(x, kernel, bias, stride)
  return strided_depthwise_conv2d_reference(
      x, kernel, bias, stride=int(stride)).astype(x.dtype)


class StripSelfAttention(HeadGated):
  """S2AFormer SSA layer on [B, H, W, dim] (see the module docstring for
  which constants are the paper's and which are ours).

  Parameters: `q` Linear(dim, qk_dim) (1x1 conv compressing queries),
  when sr_ratio > 1 the reduction `sr_kernel` [r, r, dim] + `sr_bias` [dim]
  (depth-wise, stride r) and `norm` LayerNorm(dim), `k` Linear(dim, qk_dim)
  and `v` Linear(dim, dim) on the reduced map, `proj` Linear(dim, dim).
  """

  def __init__(self, dim: int, num_heads: int, sr_ratio: int = 2,
               qk_dim: Optional[int] = None, *, qkv_bias: bool = True,
               qk_scale: Optional[float] = None, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.dim, self.num_heads = dim, num_heads
    self.head_dim, _ = heads_and_scale(dim, num_heads)
    qk_dim = dim // 4 if qk_dim is None else qk_dim
    if (not isinstance(qk_dim, (int, np.integer)) or qk_dim < num_heads
        or qk_dim % num_heads):
      raise ValueError(f"`qk_dim` ({qk_dim!r}) must be a positive multiple "
                       f"of `num_heads` ({num_heads}).")
    if not isinstance(sr_ratio, (int, np.integer)) or sr_ratio < 1:
      raise ValueError(f"`sr_ratio` must be an int >= 1, got {sr_ratio!r}.")
    self.qk_dim, self.sr_ratio = int(qk_dim), int(sr_ratio)
    self.qk_head_dim = self.qk_dim // num_heads
    self.scale = layer_scale(qk_scale, self.qk_head_dim ** -0.5)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q = nnx.Linear(dim, self.qk_dim, use_bias=qkv_bias, **kw)
    self.k = nnx.Linear(dim, self.qk_dim, use_bias=qkv_bias, **kw)
    self.v = nnx.Linear(dim, dim, use_bias=qkv_bias, **kw)
    self.proj = nnx.Linear(dim, dim, **kw)
    r = self.sr_ratio
    if r > 1:
      # fan_in of a depth-wise r x r kernel is r * r (LeCun normal)
      self.sr_kernel = nnx.Param(
          nnx.initializers.lecun_normal()(rngs.params(), (r, r, 1, dim),
                                          param_dtype).reshape(r, r, dim))
      self.sr_bias = nnx.Param(jnp.zeros((dim,), param_dtype))
      self.norm = nnx.LayerNorm(dim, **kw)
    else:
      self.sr_kernel = self.sr_bias = self.norm = None

  def reduce(self, x):
    """The reduced map [B, ceil(H / r), ceil(W / r), dim] K and V come from."""
    if self.sr_kernel is None:
      return x
    return self.norm(spatial_reduction(x, self.sr_kernel[...].astype(x.dtype),
                                       self.sr_bias[...].astype(x.dtype),
                                       stride=self.sr_ratio))

  def __call__(self, x):
    check_channels_last(x, self.dim, 2)
    n = self.num_heads
    q = self.q(x).reshape(*x.shape[:-1], n, self.qk_head_dim)
    xr = self.reduce(x)
    k = self.k(xr).reshape(*xr.shape[:-1], n, self.qk_head_dim)
    v = self.v(xr).reshape(*xr.shape[:-1], n, self.head_dim)
    out = strip_self_attention(q, k, v, scale=self.scale)
    return self.proj(self.gate_heads(out).reshape(x.shape))


class HybridPerceptionBlock(nnx.Module):
  """S2AFormer's HPB on [B, H, W, dim]:
  x + DWConv(x), + SSA(LN .), + LIM(LN .) (when `local_module` is given),
  + MLP(LN .). Parameters: `dw_kernel` [k, k, dim] + `dw_bias` (depth-wise,
  'same' zero padding), `norm1`, `attn` (StripSelfAttention), `norm2` +
  `local_module` (optional), `norm3`, `fc1` Linear(dim, mlp_ratio dim),
  GELU, `fc2`.
  """

  def __init__(self, dim: int, num_heads: int, sr_ratio: int = 2,
               qk_dim: Optional[int] = None, *, mlp_ratio: float = 4.0,
               dw_kernel_size: int = 3, local_module=None,
               qkv_bias: bool = True, qk_scale: Optional[float] = None,
               dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    if (not isinstance(dw_kernel_size, (int, np.integer))
        or dw_kernel_size < 1 or dw_kernel_size % 2 == 0):
      raise ValueError(f"`dw_kernel_size` must be an odd int >= 1, got "
                       f"{dw_kernel_size!r}.")
    self.dim = dim
    k = int(dw_kernel_size)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.dw_kernel = nnx.Param(
        nnx.initializers.lecun_normal()(rngs.params(), (k, k, 1, dim),
                                        param_dtype).reshape(k, k, dim))
    self.dw_bias = nnx.Param(jnp.zeros((dim,), param_dtype))
    self.norm1 = nnx.LayerNorm(dim, **kw)
    self.attn = StripSelfAttention(dim, num_heads, sr_ratio, qk_dim,
                                   qkv_bias=qkv_bias, qk_scale=qk_scale, **kw)
    self.norm2 = nnx.LayerNorm(dim, **kw) if local_module is not None else None
    self.local_module = local_module
    self.norm3 = nnx.LayerNorm(dim, **kw)
    hidden = int(dim * mlp_ratio)
    self.fc1 = nnx.Linear(dim, hidden, **kw)
    self.fc2 = nnx.Linear(hidden, dim, **kw)

  def __call__(self, x):
    check_channels_last(x, self.dim, 2)
    x = x + depthwise_conv2d(x, self.dw_kernel[...],
                             self.dw_bias[...]).astype(x.dtype)
    x = x + self.attn(self.norm1(x))
    if self.local_module is not None:
      x = x + self.local_module(self.norm2(x))
    return x + self.fc2(nnx.gelu(self.fc1(self.norm3(x)), approximate=False))
