"""Attention on the sphere (Bonev et al. 2025, "Attention on the Sphere"):
quadrature-weighted attention for signals on S^2.

On the sphere the attention integral

    out(x) = int_S2 exp(q(x).k(y) s) v(y) dmu(y) / int_S2 exp(q(x).k(y) s) dmu(y)

is discretized with quadrature weights w_j of the grid, which is a softmax
with `log w_j` added to the logits:

    out_i = sum_j w_j e^{s q_i.k_j} v_j / sum_j w_j e^{s q_i.k_j}

On an equiangular (lat/lon) grid the pixels near the poles cover little area,
so plain attention over-weights them; the weights make the result converge
to the integral as the grid is refined (tested against the analytic
integral).

`sphere_quadrature_weights(nlat, nlon, grid)`: [nlat, nlon] weights summing
to 4 pi. 'equiangular': colatitudes theta_j = pi j / (nlat - 1) (poles
included) with Clenshaw-Curtis weights in cos(theta) (exact for polynomials
of degree < nlat in cos theta); 'legendre-gauss': Gauss-Legendre nodes in
cos(theta) (exact below degree 2 nlat). Longitudes 2 pi i / nlon (weight
2 pi / nlon each, the trapezoid rule, exact for trigonometric polynomials).

`spherical_attention(q, k, v, *, quad_weights=None, grid='equiangular',
key_mask=None)` on [B, nlat, nlon, N, Hd] (dense over the S = nlat * nlon
pixels); `SphericalAttention` is the layer. Zero weights and `key_mask`
entries are masked; a query with nothing to attend to returns zeros.
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnjax._dispatch import Op
from attnjax.spatial._common import HeadGated
from attnjax.spatial._common import (heads_and_scale, check_channels_last,
                                     check_spatial_qkv, default_scale,
                                     flatten_spatial, masked_softmax,
                                     repeat_kv)

__all__ = ["spherical_attention", "spherical_attention_reference",
           "sphere_quadrature_weights", "sphere_grid", "SphericalAttention",
           "SPHERICAL_ATTENTION"]

SPHERICAL_ATTENTION = Op("spatial.spherical_attention")


def _clenshaw_curtis(n):
  """Nodes x_j = cos(pi j / (n - 1)) and weights on [-1, 1] (n >= 2)."""
  m = n - 1
  theta = np.pi * np.arange(n) / m
  w = np.zeros(n)
  for j in range(n):
    s = 0.0
    for k in range(1, m // 2 + 1):
      b = 1.0 if 2 * k == m else 2.0
      s += b / (4 * k * k - 1) * np.cos(2 * k * theta[j])
    c = 1.0 if j in (0, m) else 2.0
    w[j] = c / m * (1 - s)
  return np.cos(theta), w


def sphere_grid(nlat: int, grid: str = "equiangular"):
  """Colatitudes theta [nlat] (0 = north pole) of the grid."""
  if grid == "equiangular":
    if nlat < 2:
      raise ValueError(f"`nlat` must be >= 2 for an equiangular grid, got "
                       f"{nlat}.")
    return np.pi * np.arange(nlat) / (nlat - 1)
  if grid == "legendre-gauss":
    x, _ = np.polynomial.legendre.leggauss(nlat)
    return np.arccos(x[::-1])
  raise ValueError(f"`grid` must be 'equiangular' or 'legendre-gauss', got "
                   f"{grid!r}.")


def sphere_quadrature_weights(nlat: int, nlon: int, grid: str = "equiangular"):
  """[nlat, nlon] float64 quadrature weights of the grid (sum 4 pi)."""
  if nlon < 1:
    raise ValueError(f"`nlon` must be >= 1, got {nlon}.")
  sphere_grid(nlat, grid)                      # validates
  if grid == "equiangular":
    _, w = _clenshaw_curtis(nlat)
  else:
    _, w = np.polynomial.legendre.leggauss(nlat)
    w = w[::-1]
  return np.repeat(w[:, None], nlon, 1) * (2 * np.pi / nlon)


def _check(query, key, value, quad_weights, key_mask):
  check_spatial_qkv(query, key, value, spatial_dims=(2,))
  want = tuple(query.shape[1:3])
  if quad_weights is not None and tuple(quad_weights.shape) != want:
    raise ValueError(f"`quad_weights` must be [nlat, nlon]={want}, got "
                     f"{tuple(quad_weights.shape)}.")
  if key_mask is not None and (tuple(key_mask.shape) != query.shape[:3]
                               or key_mask.dtype != jnp.bool_):
    raise ValueError(f"`key_mask` must be bool [B, nlat, nlon]="
                     f"{query.shape[:3]}, got {tuple(key_mask.shape)} "
                     f"{key_mask.dtype}.")


def _weights(query, quad_weights, grid):
  if quad_weights is None:
    quad_weights = sphere_quadrature_weights(query.shape[1], query.shape[2],
                                             grid)
  return jnp.asarray(quad_weights, jnp.float32)


def _xla(config, query, key, value, *, quad_weights, key_mask, scale):
  del config
  n = query.shape[-2]
  w = quad_weights.reshape(-1)
  ok = (w > 0)[None, None, None]
  if key_mask is not None:
    km = key_mask[..., None, None]
    key, value = jnp.where(km, key, 0), jnp.where(km, value, 0)
    ok = ok & key_mask.reshape(key.shape[0], 1, 1, -1)
  q = flatten_spatial(query)
  k, v = (repeat_kv(flatten_spatial(x), n) for x in (key, value))
  logits = jnp.einsum("btnd,bsnd->bnts", q, k,
                      preferred_element_type=jnp.float32) * scale
  logits = logits + jnp.log(jnp.where(w > 0, w, 1.0))
  p = masked_softmax(logits, ok)
  out = jnp.einsum("bnts,bsne->btne", p.astype(v.dtype), v,
                   preferred_element_type=jnp.float32).astype(query.dtype)
  return out.reshape(query.shape[:-1] + value.shape[-1:])


SPHERICAL_ATTENTION.register("xla", _xla)


def spherical_attention(query, key, value, *, quad_weights=None,
                        grid: str = "equiangular", key_mask=None,
                        scale: Optional[float] = None, implementation=None):
  """Quadrature-weighted attention on a lat/lon grid.

  Args:
    query: [B, nlat, nlon, N, Hd]; key/value [B, nlat, nlon, K, Hd|Hv].
    quad_weights: [nlat, nlon] (default: `sphere_quadrature_weights` of
      `grid`).
    key_mask: optional bool [B, nlat, nlon].
    implementation: dispatch (`SPHERICAL_ATTENTION`: 'xla').
  Returns: [B, nlat, nlon, N, Hv] in query.dtype.
  """
  _check(query, key, value, quad_weights, key_mask)
  return SPHERICAL_ATTENTION(implementation, query, key, value,
                             quad_weights=_weights(query, quad_weights, grid),
                             key_mask=key_mask,
                             scale=default_scale(scale, query.shape[-1]))


def spherical_attention_reference(query, key, value, *, quad_weights=None,
                                  grid: str = "equiangular", key_mask=None,
                                  scale: Optional[float] = None):
  """The weighted-sum formula literally: sum_j w_j e^{s_ij} v_j / sum_j
  w_j e^{s_ij} (row max subtracted), float32."""
  _check(query, key, value, quad_weights, key_mask)
  n = query.shape[-2]
  w = _weights(query, quad_weights, grid).reshape(-1)
  scale = default_scale(scale, query.shape[-1])
  f32 = lambda x: x.astype(jnp.float32)
  q = f32(flatten_spatial(query))
  k, v = (f32(repeat_kv(flatten_spatial(x), n)) for x in (key, value))
  wk = jnp.broadcast_to(w, k.shape[:2])
  if key_mask is not None:
    valid = key_mask.reshape(k.shape[0], -1)
    wk = jnp.where(valid, wk, 0.0)
    k = jnp.where(valid[..., None, None], k, 0.0)
    v = jnp.where(valid[..., None, None], v, 0.0)
  s = jnp.einsum("btnd,bsnd->bnts", q, k) * scale
  use = (wk > 0)[:, None, None]
  s = s - jnp.max(jnp.where(use, s, -1e30), -1, keepdims=True)
  e = jnp.where(use, jnp.exp(jnp.where(use, s, 0.0)), 0.0) * wk[:, None, None]
  den = e.sum(-1, keepdims=True)
  out = jnp.einsum("bnts,bsne->btne", e / jnp.where(den > 0, den, 1.0), v)
  return out.reshape(query.shape[:-1] + value.shape[-1:]).astype(query.dtype)


class SphericalAttention(HeadGated):
  """Global attention on the sphere on [B, nlat, nlon, C]: `qkv` Linear(C,
  3C), `proj` Linear(C, C), quadrature weights of `grid` for the input's
  grid size."""

  def __init__(self, dim: int, num_heads: int, *, grid: str = "equiangular",
               qkv_bias: bool = True, qk_scale: Optional[float] = None,
               dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    sphere_grid(4, grid)                         # validates the name
    self.dim, self.num_heads = dim, num_heads
    self.head_dim, self.scale = heads_and_scale(dim, num_heads, qk_scale)
    self.grid = grid
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.qkv = nnx.Linear(dim, 3 * dim, use_bias=qkv_bias, **kw)
    self.proj = nnx.Linear(dim, dim, **kw)

  def __call__(self, x, key_mask=None):
    check_channels_last(x, self.dim, 2)
    qkv = self.qkv(x).reshape(*x.shape[:-1], 3, self.num_heads, self.head_dim)
    out = spherical_attention(qkv[..., 0, :, :], qkv[..., 1, :, :],
                              qkv[..., 2, :, :], grid=self.grid,
                              key_mask=key_mask, scale=self.scale)
    return self.proj(self.gate_heads(out).reshape(x.shape))
