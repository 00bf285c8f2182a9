"""Multi-head Gaussian adaptive attention (GAAM; Ioannides, Chadha and Elkins
2024, "Gaussian Adaptive Attention is All You Need", later "Density Adaptive
Attention"; the authors' code: github.com/gioannides/DAAM-PEFT-paper-code).

GAAM replaces query-key correlation by a learned Gaussian density over the
statistics of the attended axis. For x [B, T, N, H] (N heads of H features)
attended along the sequence axis, with per-head, per-feature learnable mean
offset delta [N, H] and variance scale c [N, H] (> 0):

  mu    = mean_t x,   var = |mean_t x^2 - mu^2| + 1e-8     (per b, n, h)
  y     = (x - (mu + delta)) / sqrt(var + eps)
  g     = exp(-y^2 / (2 c))                                (the weights)
  out   = x * g

(the authors' DAAM module: `exp(-(y_norm ** 2 / (2 * c)))`, mean offset
added to the mean, c initialised to 2). Cost O(T N H): no T x T map.

Patterns: there is one sequence (no query/key pair), so only self patterns;
`is_causal=True` uses the prefix statistics mu_t, var_t over positions
<= t (a causal variant; the paper's models are non-causal). Masks: `mask`
[B, T] (True = present) leaves padded positions out of the statistics and
gives zeros there; they are replaced by zeros with a select first, so NaN/Inf
in a padded position reach no output or gradient. A sequence with no
present position gives zeros.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax._dispatch import Op
from attnjax.sequence import _common

__all__ = ["GaussianAdaptiveAttention", "gaussian_adaptive_attention",
           "gaussian_adaptive_attention_reference",
           "gaussian_adaptive_weights"]

_OP = Op("gaussian_adaptive_attention")


def _prepare(x, mean_offset, c, mask):
  x = jnp.asarray(x)
  if x.ndim not in (3, 4):
    raise ValueError(f"`x` must be [batch, length, heads, head_dim] (or "
                     f"unbatched [length, heads, head_dim]), got shape "
                     f"{tuple(x.shape)}.")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"`x` must be floating point, got dtype {x.dtype}.")
  unbatched = x.ndim == 3
  if unbatched:
    x = x[None]
  b, t, n, h = x.shape
  for name, p in (("mean_offset", mean_offset), ("c", c)):
    if jnp.shape(p) not in ((n, h), (n, 1), (n,)):
      raise ValueError(f"`{name}` must be [heads, head_dim] = [{n}, {h}] (or "
                       f"[{n}] per head), got shape {tuple(jnp.shape(p))}.")
  shape = lambda p: jnp.reshape(jnp.asarray(p, jnp.float32),
                                (n, -1))[None, None]
  keep = None
  if mask is not None:
    mask = jnp.asarray(mask)
    want = (t,) if unbatched else (b, t)
    if mask.dtype != jnp.bool_ or tuple(mask.shape) != want:
      raise ValueError(f"`mask` must be boolean {list(want)} (True = present), "
                       f"got {mask.dtype} {tuple(mask.shape)}.")
    keep = mask[None] if unbatched else mask
  xf = _common.zero_masked(x, keep).astype(jnp.float32)
  return xf, shape(mean_offset), shape(c), keep, unbatched


def _stats(xf, keep, is_causal):
  """mu, var over the sequence (prefix when causal), masked positions out."""
  w = (jnp.ones(xf.shape[:2], jnp.float32) if keep is None
       else keep.astype(jnp.float32))[..., None, None]
  if is_causal:
    cnt = jnp.cumsum(w, axis=1)
    s1 = jnp.cumsum(xf * w, axis=1)
    s2 = jnp.cumsum(jnp.square(xf) * w, axis=1)
  else:
    cnt = jnp.sum(w, axis=1, keepdims=True)
    s1 = jnp.sum(xf * w, axis=1, keepdims=True)
    s2 = jnp.sum(jnp.square(xf) * w, axis=1, keepdims=True)
  cnt = jnp.maximum(cnt, 1.0)
  mu = s1 / cnt
  var = jnp.abs(s2 / cnt - jnp.square(mu)) + 1e-8
  return mu, var


def _weights(xf, mu, var, delta, c, eps):
  y = (xf - (mu + delta)) * jax.lax.rsqrt(var + eps)
  return jnp.exp(-jnp.square(y) / (2.0 * c))


def _xla_backend(config, xf, delta, c, keep, is_causal, eps):
  del config
  mu, var = _stats(xf, keep, is_causal)
  out = xf * _weights(xf, mu, var, delta, c, eps)
  return _common.zero_masked(out, keep)


_OP.register("xla", _xla_backend)


def gaussian_adaptive_attention(x, mean_offset, c, *, mask=None,
                                is_causal: bool = False, eps: float = 1e-5,
                                implementation=None):
  """GAAM along the sequence axis.

  Args:
    x: [B, T, N, H] (or [T, N, H]).
    mean_offset: delta [N, H] (or [N]); c: variance scale [N, H] (or [N]),
      positive (c <= 0 gives non-finite weights).
    mask: bool [B, T], True = position present.
    is_causal: prefix statistics (position t sees 0..t).
    eps: added to the variance.
    implementation: dispatch of op "gaussian_adaptive_attention" ("xla").

  Returns:
    x * g in x.dtype, same shape as x.
  """
  xf, delta, cc, keep, unbatched = _prepare(x, mean_offset, c, mask)
  out = _OP(implementation, xf, delta, cc, keep, bool(is_causal), float(eps))
  out = out.astype(jnp.asarray(x).dtype)
  return out[0] if unbatched else out


def gaussian_adaptive_weights(x, mean_offset, c, *, mask=None,
                              is_causal: bool = False, eps: float = 1e-5):
  """The Gaussian weights g (float32, same shape as x; zeros at padded
  positions): the attention map the paper visualizes."""
  xf, delta, cc, keep, unbatched = _prepare(x, mean_offset, c, mask)
  mu, var = _stats(xf, keep, is_causal)
  g = _common.zero_masked(_weights(xf, mu, var, delta, cc, eps), keep)
  return g[0] if unbatched else g


def gaussian_adaptive_attention_reference(x, mean_offset, c, *, mask=None,
                                          is_causal: bool = False,
                                          eps: float = 1e-5):
  """Statistics by an explicit [T, T] averaging matrix (no cumulative sums)."""
  xf, delta, cc, keep, unbatched = _prepare(x, mean_offset, c, mask)
  b, t = xf.shape[:2]
  w = jnp.ones((b, t)) if keep is None else keep.astype(jnp.float32)
  tri = (jnp.tril(jnp.ones((t, t))) if is_causal else jnp.ones((t, t)))
  a = tri[None] * w[:, None, :]                               # [B, T, T]
  a = a / jnp.maximum(jnp.sum(a, axis=-1, keepdims=True), 1.0)
  mu = jnp.einsum("bts,bsnh->btnh", a, xf)
  var = jnp.abs(jnp.einsum("bts,bsnh->btnh", a, jnp.square(xf)) -
                jnp.square(mu)) + 1e-8
  out = xf * jnp.exp(-jnp.square(xf - mu - delta) / (var + eps) / (2.0 * cc))
  out = _common.zero_masked(out, keep).astype(jnp.asarray(x).dtype)
  return out[0] if unbatched else out


class GaussianAdaptiveAttention(nnx.Module):
  """Multi-head GAAM on [B, T, features]: features split into `num_heads`
  heads, learnable mean offsets (init 0) and variance scales c (init
  `c_init`, the authors' 2) per feature; `layer(x, mask=None,
  is_causal=False)`."""

  def __init__(self, features: int, num_heads: int, *, c_init: float = 2.0,
               eps: float = 1e-5, param_dtype=jnp.float32, rngs: nnx.Rngs):
    del rngs
    features = _common.check_positive_int("features", features)
    num_heads = _common.check_positive_int("num_heads", num_heads)
    if features % num_heads:
      raise ValueError(f"`features` ({features}) must be divisible by "
                       f"`num_heads` ({num_heads}).")
    self.num_heads, self.eps = num_heads, eps
    shape = (num_heads, features // num_heads)
    self.mean_offset = nnx.Param(jnp.zeros(shape, param_dtype))
    self.c = nnx.Param(jnp.full(shape, c_init, param_dtype))

  def __call__(self, x, *, mask=None, is_causal: bool = False):
    if x.ndim != 3:
      raise ValueError(f"`x` must be [batch, length, features], got shape "
                       f"{tuple(x.shape)}.")
    xh = x.reshape(x.shape[:2] + (self.num_heads, -1))
    y = gaussian_adaptive_attention(xh, self.mean_offset.value, self.c.value,
                                    mask=mask, is_causal=is_causal,
                                    eps=self.eps)
    return y.reshape(x.shape)
