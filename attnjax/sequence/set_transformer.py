"""Set Transformer blocks (Lee et al. 2019, "Set Transformer: A Framework for
Attention-based Permutation-Invariant Neural Networks").

  MAB(X, Y) = LayerNorm(H + rFF(H)),  H = LayerNorm(X + Multihead(X, Y, Y))
  SAB(X)    = MAB(X, X)
  ISAB_m(X) = MAB(X, H),  H = MAB(I, X)      (I: m learned inducing points)
  PMA_k(Z)  = MAB(S, rFF(Z))                 (S: k learned seed vectors)

Multihead(Q, K, V) = concat_j softmax(Q W_j^Q (K W_j^K)^T * scale) V W_j^V, then
W^O (scale 1/sqrt(head_dim) by default); rFF is the row-wise feed-forward
relu(x W1 + b1) W2 + b2. `layer_norm=False` drops both LayerNorms (the paper
trains some models without them).

Sets of different sizes are padded: `mask` [B, m] (True = element present)
marks the elements of the attended set Y; padded elements are left out of
every softmax (a set with no element gives a zero attention term, so the
block returns the feed-forward of X alone). `query_mask` [B, n] marks the
present rows of X: padded rows of the output are zeros. Padded elements are
replaced by zeros with a select before anything reads them, so NaN/Inf there
reach no output and no gradient. SAB/ISAB/PMA take one `mask` for their
input set and route it to the right place.

Parameters are plain dicts of arrays (`init_mab_params`), so every block is a
pure function; the NNX layers `MAB`, `SAB`, `ISAB`, `PMA` hold them as
`nnx.Param`s. The attention core runs `attnjax.dot_product_attention` (the
xla backend of the op "set_transformer.mab"); the `*_reference` functions
form the scores with plain einsums.

Cost: SAB is quadratic in the set size; ISAB is O(n m) and PMA O(n k).
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax._dispatch import Op
from attnjax._numerics import masked_softmax
from attnjax.sequence import _common
from attnjax.softmax import dot_product_attention

__all__ = ["ISAB", "MAB", "PMA", "SAB", "init_mab_params", "isab",
           "isab_reference", "mab", "mab_reference", "pma", "pma_reference",
           "sab", "sab_reference"]

_MAB_KEYS = ("wq", "bq", "wk", "bk", "wv", "bv", "wo", "bo", "w1", "b1", "w2",
             "b2")
_LN_KEYS = ("ln1_scale", "ln1_bias", "ln2_scale", "ln2_bias")

_OP = Op("set_transformer.mab")


def init_mab_params(rng, dim: int, dim_y: Optional[int] = None, *,
                    ff_dim: Optional[int] = None, layer_norm: bool = True,
                    dtype=jnp.float32):
  """Parameters of one MAB: X has width `dim`, Y width `dim_y` (default dim);
  the feed-forward hidden width is `ff_dim` (default dim). Weights are
  LeCun-normal, biases zero, LayerNorm scales one."""
  dim = _common.check_positive_int("dim", dim)
  dim_y = dim if dim_y is None else _common.check_positive_int("dim_y", dim_y)
  ff_dim = dim if ff_dim is None else _common.check_positive_int("ff_dim",
                                                                  ff_dim)
  shapes = {"wq": (dim, dim), "wk": (dim_y, dim), "wv": (dim_y, dim),
            "wo": (dim, dim), "w1": (dim, ff_dim), "w2": (ff_dim, dim)}
  keys = jax.random.split(rng, len(shapes))
  p = {}
  for key, (name, shape) in zip(keys, shapes.items()):
    p[name] = (jax.random.normal(key, shape, jnp.float32) /
               math.sqrt(shape[0])).astype(dtype)
    p["b" + name[1:]] = jnp.zeros((shape[1],), dtype)
  if layer_norm:
    for i in (1, 2):
      p[f"ln{i}_scale"] = jnp.ones((dim,), dtype)
      p[f"ln{i}_bias"] = jnp.zeros((dim,), dtype)
  return p


# --------------------------------------------------------------------------
# validation


def _check_set(name, x, rank_of=None):
  x = jnp.asarray(x)
  if x.ndim not in (2, 3):
    raise ValueError(f"`{name}` must be [batch, set_size, features] or "
                     f"[set_size, features], got shape {tuple(x.shape)}.")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"`{name}` must be floating point, got dtype {x.dtype}.")
  if rank_of is not None and x.ndim != rank_of[1].ndim:
    raise ValueError(
        f"`{name}` and `{rank_of[0]}` must both be batched or both unbatched: "
        f"shapes {name}={tuple(x.shape)}, {rank_of[0]}={tuple(rank_of[1].shape)}.")
  return x


def _check_set_mask(name, mask, b, n, unbatched):
  if mask is None:
    return None
  mask = jnp.asarray(mask)
  if mask.dtype != jnp.bool_:
    raise ValueError(f"`{name}` must be boolean (True = element present), got "
                     f"dtype {mask.dtype}.")
  want = (n,) if unbatched else (b, n)
  if tuple(mask.shape) != want:
    raise ValueError(f"`{name}` must have shape {list(want)}, got "
                     f"{tuple(mask.shape)}.")
  return mask if not unbatched else mask[None]


def _check_params(params, dim, dim_y, layer_norm):
  if not isinstance(params, dict):
    raise ValueError(f"`params` must be a dict of arrays (init_mab_params), "
                     f"got {type(params).__name__}.")
  need = _MAB_KEYS + (_LN_KEYS if layer_norm else ())
  missing = [k for k in need if k not in params]
  if missing:
    raise ValueError(f"`params` is missing {missing} (layer_norm="
                     f"{layer_norm}); has {sorted(params)}.")
  d = params["wq"].shape[-1]
  f = params["w1"].shape[-1]
  want = {"wq": (dim, d), "bq": (d,), "wk": (dim_y, d), "bk": (d,),
          "wv": (dim_y, d), "bv": (d,), "wo": (d, dim), "bo": (dim,),
          "w1": (dim, f), "b1": (f,), "w2": (f, dim), "b2": (dim,)}
  if layer_norm:
    want.update({k: (dim,) for k in _LN_KEYS})
  for k, shape in want.items():
    if tuple(params[k].shape) != shape:
      raise ValueError(
          f"`params['{k}']` must have shape {list(shape)} for x width {dim} "
          f"and y width {dim_y}, got {tuple(params[k].shape)}.")
  return d


# --------------------------------------------------------------------------
# the block


def _attend_dense(q, k, v, kv_mask, scale):
  """Plain-einsum attention (the reference core): q [B,n,h,e], k/v [B,m,h,e]."""
  s = jnp.einsum("bnhe,bmhe->bhnm", q, k) * scale
  ok = None if kv_mask is None else kv_mask[:, None, None, :]
  p = masked_softmax(s, ok, axis=-1)
  return jnp.einsum("bhnm,bmhe->bnhe", p, v)


def _attend_dispatch(q, k, v, kv_mask, scale):
  mask = None if kv_mask is None else kv_mask[:, None, None, :]
  return dot_product_attention(q, k, v, mask=mask, scale=scale)


def _layer_norm(x, scale, bias, eps=1e-5):
  mu = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mu), axis=-1, keepdims=True)
  return (x - mu) * jax.lax.rsqrt(var + eps) * scale + bias


def _mab_core(x, y, params, num_heads, kv_mask, q_mask, layer_norm, scale,
              attend):
  """x [B, n, dim], y [B, m, dim_y] float32; masks [B, m] / [B, n] or None."""
  p = {k: v.astype(jnp.float32) for k, v in params.items()}
  b, n, _ = x.shape
  m = y.shape[1]
  d = p["wq"].shape[-1]
  e = d // num_heads
  x = _common.zero_masked(x, q_mask)
  y = _common.zero_masked(y, kv_mask)
  q = (x @ p["wq"] + p["bq"]).reshape(b, n, num_heads, e)
  k = (y @ p["wk"] + p["bk"]).reshape(b, m, num_heads, e)
  v = (y @ p["wv"] + p["bv"]).reshape(b, m, num_heads, e)
  scale = 1.0 / math.sqrt(e) if scale is None else float(scale)
  att = attend(q, k, v, kv_mask, scale).astype(jnp.float32).reshape(b, n, d)
  h = x + att @ p["wo"] + p["bo"]
  if layer_norm:
    h = _layer_norm(h, p["ln1_scale"], p["ln1_bias"])
  out = h + jax.nn.relu(h @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
  if layer_norm:
    out = _layer_norm(out, p["ln2_scale"], p["ln2_bias"])
  return _common.zero_masked(out, q_mask)


def _xla_backend(config, x, y, params, num_heads, kv_mask, q_mask, layer_norm,
                 scale):
  del config
  return _mab_core(x, y, params, num_heads, kv_mask, q_mask, layer_norm,
                   scale, _attend_dispatch)


_OP.register("xla", _xla_backend)


def _prepare(x, y, params, num_heads, mask, query_mask, layer_norm):
  x = _check_set("x", x)
  y = _check_set("y", y, rank_of=("x", x))
  unbatched = x.ndim == 2
  if unbatched:
    x, y = x[None], y[None]
  if x.shape[0] != y.shape[0]:
    raise ValueError(f"batch sizes of `x` and `y` differ: shapes "
                     f"x={tuple(x.shape)}, y={tuple(y.shape)}.")
  num_heads = _common.check_positive_int("num_heads", num_heads)
  d = _check_params(params, x.shape[-1], y.shape[-1], layer_norm)
  if d % num_heads:
    raise ValueError(f"the attention width {d} (params['wq'] shape "
                     f"{tuple(params['wq'].shape)}) must be divisible by "
                     f"`num_heads` ({num_heads}).")
  kv_mask = _check_set_mask("mask", mask, y.shape[0], y.shape[1], unbatched)
  q_mask = _check_set_mask("query_mask", query_mask, x.shape[0], x.shape[1],
                           unbatched)
  return x.astype(jnp.float32), y.astype(jnp.float32), kv_mask, q_mask, \
      unbatched, num_heads


def _run(x, y, params, num_heads, mask, query_mask, layer_norm, scale,
         implementation, attend=None):
  dtype = jnp.asarray(x).dtype
  xf, yf, kv_mask, q_mask, unbatched, num_heads = _prepare(
      x, y, params, num_heads, mask, query_mask, layer_norm)
  if attend is None:
    out = _OP(implementation, xf, yf, params, num_heads, kv_mask, q_mask,
              layer_norm, scale)
  else:
    out = _mab_core(xf, yf, params, num_heads, kv_mask, q_mask, layer_norm,
                    scale, attend)
  out = out.astype(dtype)
  return out[0] if unbatched else out


def mab(x, y, params, *, num_heads: int, mask=None, query_mask=None,
        layer_norm: bool = True, scale: Optional[float] = None,
        implementation=None):
  """Multihead attention block MAB(X, Y).

  Args:
    x: [B, n, dim] (or [n, dim]) queries; y: [B, m, dim_y] attended set.
    params: `init_mab_params(rng, dim, dim_y)` (attention width
      params['wq'].shape[1], divisible by num_heads).
    num_heads: attention heads.
    mask: bool [B, m], True = element of y present (None: all present).
    query_mask: bool [B, n], True = row of x present; other output rows are 0.
    layer_norm: apply the two LayerNorms of the paper.
    scale: logit scale, default 1/sqrt(head width).
    implementation: dispatch of op "set_transformer.mab" (only "xla").

  Returns:
    [B, n, dim] in x.dtype.
  """
  return _run(x, y, params, num_heads, mask, query_mask, layer_norm, scale,
              implementation)


def mab_reference(x, y, params, *, num_heads: int, mask=None, query_mask=None,
                  layer_norm: bool = True, scale: Optional[float] = None):
  """MAB with the scores formed by plain einsums and the masked softmax."""
  return _run(x, y, params, num_heads, mask, query_mask, layer_norm, scale,
              None, attend=_attend_dense)


def _sab(fn, x, params, num_heads, mask, **kw):
  return fn(x, x, params, num_heads=num_heads, mask=mask, query_mask=mask,
            **kw)


def sab(x, params, *, num_heads: int, mask=None, layer_norm: bool = True,
        scale: Optional[float] = None, implementation=None):
  """Set attention block SAB(X) = MAB(X, X); `mask` [B, n] pads X (padded
  rows of the output are zeros). O(n^2)."""
  return _sab(mab, x, params, num_heads, mask, layer_norm=layer_norm,
              scale=scale, implementation=implementation)


def sab_reference(x, params, *, num_heads: int, mask=None,
                  layer_norm: bool = True, scale: Optional[float] = None):
  return _sab(mab_reference, x, params, num_heads, mask,
              layer_norm=layer_norm, scale=scale)


def _broadcast_learned(name, s, x):
  s = jnp.asarray(s)
  if s.ndim != 2 or s.shape[-1] != x.shape[-1]:
    raise ValueError(f"`{name}` must be [count, {x.shape[-1]}] (the width of "
                     f"`x`), got shape {tuple(s.shape)}.")
  s = s.astype(x.dtype)
  return s if x.ndim == 2 else jnp.broadcast_to(s, (x.shape[0],) + s.shape)


def _isab(fn, x, inducing, params_in, params_out, num_heads, mask, **kw):
  x = _check_set("x", x)
  i = _broadcast_learned("inducing", inducing, x)
  h = fn(i, x, params_in, num_heads=num_heads, mask=mask, **kw)
  return fn(x, h, params_out, num_heads=num_heads, query_mask=mask, **kw)


def isab(x, inducing, params_in, params_out, *, num_heads: int, mask=None,
         layer_norm: bool = True, scale: Optional[float] = None,
         implementation=None):
  """Induced set attention block: H = MAB(I, X) with `inducing` I [m, dim]
  (params_in), then MAB(X, H) (params_out). `mask` [B, n] pads X. O(n m)."""
  return _isab(mab, x, inducing, params_in, params_out, num_heads, mask,
               layer_norm=layer_norm, scale=scale,
               implementation=implementation)


def isab_reference(x, inducing, params_in, params_out, *, num_heads: int,
                   mask=None, layer_norm: bool = True,
                   scale: Optional[float] = None):
  return _isab(mab_reference, x, inducing, params_in, params_out, num_heads,
               mask, layer_norm=layer_norm, scale=scale)


def _pma(fn, z, seeds, params, num_heads, mask, rff, **kw):
  z = _check_set("z", z)
  s = _broadcast_learned("seeds", seeds, z)
  if rff is not None:
    w, b = rff
    if tuple(w.shape) != (z.shape[-1], z.shape[-1]) or tuple(b.shape) != (
        z.shape[-1],):
      raise ValueError(f"`rff` must be (w [{z.shape[-1]}, {z.shape[-1]}], "
                       f"b [{z.shape[-1]}]), got shapes {tuple(w.shape)}, "
                       f"{tuple(b.shape)}.")
    zf = z.astype(jnp.float32)
    z = jax.nn.relu(zf @ w.astype(jnp.float32) + b.astype(jnp.float32)
                    ).astype(z.dtype)
  return fn(s, z, params, num_heads=num_heads, mask=mask, **kw)


def pma(z, seeds, params, *, num_heads: int, mask=None, rff=None,
        layer_norm: bool = True, scale: Optional[float] = None,
        implementation=None):
  """Pooling by multihead attention PMA_k(Z) = MAB(S, rFF(Z)) with `seeds`
  S [k, dim]; `rff` = (w [dim, dim], b [dim]) is the row-wise relu layer
  applied to Z first (None: skip it). `mask` [B, n] pads Z. Returns
  [B, k, dim]; O(n k)."""
  return _pma(mab, z, seeds, params, num_heads, mask, rff,
              layer_norm=layer_norm, scale=scale,
              implementation=implementation)


def pma_reference(z, seeds, params, *, num_heads: int, mask=None, rff=None,
                  layer_norm: bool = True, scale: Optional[float] = None):
  return _pma(mab_reference, z, seeds, params, num_heads, mask, rff,
              layer_norm=layer_norm, scale=scale)


# --------------------------------------------------------------------------
# NNX layers


class _MABParams(nnx.Module):
  """One MAB's parameters as nnx.Params (attribute per array)."""

  def __init__(self, rng, dim, dim_y, ff_dim, layer_norm, param_dtype):
    p = init_mab_params(rng, dim, dim_y, ff_dim=ff_dim, layer_norm=layer_norm,
                        dtype=param_dtype)
    self._names = tuple(p)
    for k, v in p.items():
      setattr(self, k, nnx.Param(v))

  def as_dict(self):
    return {k: getattr(self, k).value for k in self._names}


def _check_width(name, dim, num_heads):
  dim = _common.check_positive_int(name, dim)
  num_heads = _common.check_positive_int("num_heads", num_heads)
  if dim % num_heads:
    raise ValueError(f"`{name}` ({dim}) must be divisible by `num_heads` "
                     f"({num_heads}).")
  return dim, num_heads


class MAB(nnx.Module):
  """MAB(X, Y) layer: `layer(x, y, mask=None, query_mask=None)`."""

  def __init__(self, dim: int, num_heads: int, *, dim_y: Optional[int] = None,
               ff_dim: Optional[int] = None, layer_norm: bool = True,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.dim, self.num_heads = _check_width("dim", dim, num_heads)
    self.layer_norm = layer_norm
    self.block = _MABParams(rngs.params(), dim, dim_y, ff_dim, layer_norm,
                            param_dtype)

  def __call__(self, x, y, *, mask=None, query_mask=None):
    return mab(x, y, self.block.as_dict(), num_heads=self.num_heads,
               mask=mask, query_mask=query_mask, layer_norm=self.layer_norm)


class SAB(nnx.Module):
  """SAB(X) layer: `layer(x, mask=None)`."""

  def __init__(self, dim: int, num_heads: int, *, ff_dim: Optional[int] = None,
               layer_norm: bool = True, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.dim, self.num_heads = _check_width("dim", dim, num_heads)
    self.layer_norm = layer_norm
    self.block = _MABParams(rngs.params(), dim, None, ff_dim, layer_norm,
                            param_dtype)

  def __call__(self, x, *, mask=None):
    return sab(x, self.block.as_dict(), num_heads=self.num_heads, mask=mask,
               layer_norm=self.layer_norm)


class ISAB(nnx.Module):
  """ISAB_m(X) layer with `num_inducing` learned inducing points."""

  def __init__(self, dim: int, num_heads: int, num_inducing: int, *,
               ff_dim: Optional[int] = None, layer_norm: bool = True,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.dim, self.num_heads = _check_width("dim", dim, num_heads)
    num_inducing = _common.check_positive_int("num_inducing", num_inducing)
    self.layer_norm = layer_norm
    self.inducing = nnx.Param(
        (jax.random.normal(rngs.params(), (num_inducing, dim), jnp.float32) /
         math.sqrt(dim)).astype(param_dtype))
    self.block_in = _MABParams(rngs.params(), dim, None, ff_dim, layer_norm,
                               param_dtype)
    self.block_out = _MABParams(rngs.params(), dim, None, ff_dim, layer_norm,
                                param_dtype)

  def __call__(self, x, *, mask=None):
    return isab(x, self.inducing.value, self.block_in.as_dict(),
                self.block_out.as_dict(), num_heads=self.num_heads, mask=mask,
                layer_norm=self.layer_norm)


class PMA(nnx.Module):
  """PMA_k(Z) layer: `num_seeds` learned seeds, the row-wise rFF on Z."""

  def __init__(self, dim: int, num_heads: int, num_seeds: int, *,
               ff_dim: Optional[int] = None, layer_norm: bool = True,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.dim, self.num_heads = _check_width("dim", dim, num_heads)
    num_seeds = _common.check_positive_int("num_seeds", num_seeds)
    self.layer_norm = layer_norm
    self.seeds = nnx.Param(
        (jax.random.normal(rngs.params(), (num_seeds, dim), jnp.float32) /
         math.sqrt(dim)).astype(param_dtype))
    self.rff_w = nnx.Param(
        (jax.random.normal(rngs.params(), (dim, dim), jnp.float32) /
         math.sqrt(dim)).astype(param_dtype))
    self.rff_b = nnx.Param(jnp.zeros((dim,), param_dtype))
    self.block = _MABParams(rngs.params(), dim, None, ff_dim, layer_norm,
                            param_dtype)

  def __call__(self, z, *, mask=None):
    return pma(z, self.seeds.value, self.block.as_dict(),
               num_heads=self.num_heads, mask=mask,
               rff=(self.rff_w.value, self.rff_b.value),
               layer_norm=self.layer_norm)
