"""Strip attention (Cui et al. 2023, "Strip Attention for Image Restoration",
SANet; the strip attention unit of its code, `spatial_strip_att`).

Each pixel aggregates the `K` pixels of a horizontal (or vertical) strip
centred on it with weights predicted from the whole image: a global average
pool, a 1x1 conv to `G * K` logits and a sigmoid give one K-tap filter per
channel group (shared by all pixels of an image):

    out[y, x, c] = sum_k w[g(c), k] * x[y, reflect(x + k - K // 2), c]

(horizontal; vertical strips move along H). Borders use reflection padding,
as the official code; `K // 2` must be smaller than the strip's axis.
`CubicAttention` is SANet's unit: a horizontal then a vertical strip
attention, `gamma * out + beta * x` (gamma 0, beta 1 at init).

No keys are masked: the weights are not a softmax (sigmoid gates, not
normalized), so there are no masked rows.

Note: the issue names S2AFormer's strip attention; this module implements
SANet's strip attention unit (whose definition and code are public).
S2AFormer (Xu, Huang, Jia, Li, Gao, Qi, "S2AFormer: Strip Self-Attention for
Efficient Vision Transformer", arXiv 2505.22195, IEEE TIP 2025) is a
different mechanism, not an option of this one: its Strip Self-Attention
(global softmax attention over a K/V map reduced by a strided depthwise
conv, with Q/K compressed in channels) and Hybrid Perception Block are in
`attnjax.spatial.s2aformer`, which says which of its constants are the
paper's and which are ours (no public code; searched: GitHub repository
names, code and issues for "S2AFormer" / "Strip Self-Attention"; arXiv HTML
2505.22195v1/v2 and reviews on themoonlight.io, emergentmind,
sciencestack, chatpaper, researchtrend; the stored copies stop before the
SSA section's constants).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnjax._dispatch import Op
from attnjax.spatial._common import check_channels_last, check_floating

__all__ = ["strip_attention", "strip_attention_reference", "StripAttention",
           "CubicAttention", "STRIP_ATTENTION"]

STRIP_ATTENTION = Op("spatial.strip_attention")


def _check(x, weights, axis):
  check_floating("x", x)
  check_floating("weights", weights)
  if x.ndim != 4:
    raise ValueError(f"`x` must be [B, H, W, C], got {tuple(x.shape)}.")
  if axis not in ("h", "w"):
    raise ValueError(f"`axis` must be 'h' (vertical strips) or 'w' "
                     f"(horizontal), got {axis!r}.")
  if weights.ndim != 3 or weights.shape[0] != x.shape[0]:
    raise ValueError(f"`weights` must be [B, groups, K], got "
                     f"{tuple(weights.shape)} for x {tuple(x.shape)}.")
  g, k = weights.shape[1:]
  if g < 1 or x.shape[-1] % g or k % 2 == 0:
    raise ValueError(f"`weights` [B, groups={g}, K={k}] needs groups dividing "
                     f"C={x.shape[-1]} and odd K.")
  length = x.shape[1] if axis == "h" else x.shape[2]
  if k // 2 >= length:
    raise ValueError(f"reflection padding needs K // 2 < strip axis length: "
                     f"K={k}, x {tuple(x.shape)}, axis={axis!r}.")


def _xla(config, x, weights, *, axis):
  del config
  b, h, w, c = x.shape
  g, k = weights.shape[1:]
  r = k // 2
  ax = 1 if axis == "h" else 2
  pads = [(0, 0)] * 4
  pads[ax] = (r, r)
  xp = jnp.pad(x, pads, mode="reflect")
  n = x.shape[ax]
  taps = jnp.stack([jax.lax.slice_in_dim(xp, i, i + n, axis=ax)
                    for i in range(k)], -1)                 # [B, H, W, C, K]
  wc = jnp.repeat(weights, c // g, axis=1)                  # [B, C, K]
  out = jnp.einsum("byxck,bck->byxc", taps, wc.astype(x.dtype),
                   preferred_element_type=jnp.float32)
  return out.astype(x.dtype)


STRIP_ATTENTION.register("xla", _xla)


def strip_attention(x, weights, *, axis: str = "w", implementation=None):
  """SANet strip attention.

  Args:
    x: [B, H, W, C].
    weights: [B, groups, K] per-image filter taps (post-sigmoid), channel
      group g = c // (C / groups).
    axis: 'w' (horizontal 1 x K strips) or 'h' (vertical K x 1).
    implementation: dispatch (`STRIP_ATTENTION`: 'xla').
  Returns: [B, H, W, C] in x.dtype.
  """
  _check(x, weights, axis)
  return STRIP_ATTENTION(implementation, x, weights, axis=axis)


def strip_attention_reference(x, weights, *, axis: str = "w"):
  """Gather with explicitly reflected indices, one tap at a time (f32)."""
  _check(x, weights, axis)
  g, k = weights.shape[1:]
  c = x.shape[-1]
  n = x.shape[1] if axis == "h" else x.shape[2]
  out = 0.0
  for t in range(k):
    idx = np.arange(n) + t - k // 2
    idx = np.where(idx < 0, -idx, idx)
    idx = np.where(idx >= n, 2 * (n - 1) - idx, idx)
    xs = x[:, idx] if axis == "h" else x[:, :, idx]
    wt = jnp.repeat(weights[:, :, t], c // g, axis=1)[:, None, None, :]
    out = out + xs.astype(jnp.float32) * wt.astype(jnp.float32)
  return out.astype(x.dtype)


class StripAttention(nnx.Module):
  """SANet's `spatial_strip_att` on [B, H, W, C]: `conv` 1x1 (C -> G K, no
  bias) of the global average pool, sigmoid, strip aggregation."""

  def __init__(self, dim: int, kernel: int = 5, group: int = 2, *,
               axis: str = "w", param_dtype=jnp.float32, rngs: nnx.Rngs):
    if kernel % 2 == 0 or dim % group:
      raise ValueError(f"`kernel` ({kernel}) must be odd and `group` ({group})"
                       f" must divide `dim` ({dim}).")
    self.dim, self.kernel, self.group, self.axis = dim, kernel, group, axis
    self.conv = nnx.Linear(dim, group * kernel, use_bias=False,
                           param_dtype=param_dtype, rngs=rngs)

  def filters(self, x):
    """[B, G, K] sigmoid taps from the image mean."""
    f = self.conv(x.mean((1, 2)))
    return jax.nn.sigmoid(f).reshape(x.shape[0], self.group, self.kernel)

  def __call__(self, x):
    check_channels_last(x, self.dim, 2)
    return strip_attention(x, self.filters(x).astype(x.dtype), axis=self.axis)


class CubicAttention(nnx.Module):
  """SANet's cubic attention: horizontal then vertical strip attention,
  `gamma * out + beta * x` (per-channel gamma = 0, beta = 1 at init)."""

  def __init__(self, dim: int, kernel: int = 7, group: int = 1, *,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.H_spatial_att = StripAttention(dim, kernel, group, axis="w",
                                        param_dtype=param_dtype, rngs=rngs)
    self.W_spatial_att = StripAttention(dim, kernel, group, axis="h",
                                        param_dtype=param_dtype, rngs=rngs)
    self.gamma = nnx.Param(jnp.zeros((dim,), param_dtype))
    self.beta = nnx.Param(jnp.ones((dim,), param_dtype))

  def __call__(self, x):
    out = self.W_spatial_att(self.H_spatial_att(x))
    return self.gamma[...] * out + self.beta[...] * x
