"""Random-feature attention: frozen random query-key matrices, trainable values.

The model of Fu, Guo, Bai & Mei, "What can a Single Attention Layer Learn? A
Study Through the Random Features Lens" (NeurIPS 2023, arXiv 2307.11353): a
single multi-head attention layer reading one query vector x_0 and N key
vectors x_1..x_N, with M heads whose query-key matrices W_m are drawn i.i.d.
at random and frozen, and whose value vectors v_m are trained:

    f(x_0, X) = sum_m sum_i  a_m(x_0, X)_i  <v_m, x_i>,
    a_m(x_0, X)_i = sigma(x_0^T W_m x_i) / N          ("relu", the paper's)
                  = softmax_i(x_0^T W_m x_i)           ("softmax")

Because the W_m are frozen, f is linear in the values: f = <phi(x_0, X), V>
with random features phi_m = sum_i a_m,i x_i (`random_feature_attention_features`),
so fitting the values is (ridge) linear regression, which is what the paper
analyses.

The sampling distribution of the W_m is W_m = mean + std * G_m with G_m
i.i.d. standard Gaussian entries and `mean` either zero ("zero", the plain
random-feature attention) or `mean_scale * I` ("identity", the paper's
non-zero-mean / biased sampling, which it shows learns functions of
<x_0, x_i> with fewer samples), or any [D, D] array.

Layout. Unlike the `[B, T, N, H]` softmax primitives, the heads here do not
project the inputs: each head's bilinear form acts on the raw token vectors.
So the inputs are query `[B, T, D]` (T independent queries; the paper has
T = 1) and key `[B, S, D]` (the paper's N keys), and the per-head weights are
`qk_weights [M, D, D]`, `values [M, D, O]`; the output is `[B, T, O]`.
Unbatched `[T, D]`/`[S, D]` inputs are accepted. `mask` (bool, True = attend)
broadcasts to `[B, T, S]`; a query with no key to attend to gets zeros.
Computation is in float32 (float64 if given float64); outputs are in the
query dtype.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

NONLINEARITIES = ("relu", "softmax")
MEANS = ("zero", "identity")

__all__ = [
    "FrozenRandom", "RandomFeatureAttention", "random_feature_attention",
    "random_feature_attention_features",
    "random_feature_attention_reference", "sample_qk_weights",
]


# ----------------------------------------------------------------------------
# Validation.

def _check_inputs(query, key, qk_weights, mask, nonlinearity):
  if nonlinearity not in NONLINEARITIES:
    raise ValueError(f"`nonlinearity` must be one of {NONLINEARITIES}, got "
                     f"{nonlinearity!r}.")
  for name, x in (("query", query), ("key", key), ("qk_weights", qk_weights)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"`{name}` must be floating point, got dtype {x.dtype}.")
  if query.ndim not in (2, 3):
    raise ValueError("`query` must have shape [batch, q_len, dim] or "
                     f"[q_len, dim], got shape {tuple(query.shape)}.")
  if key.ndim != query.ndim:
    raise ValueError("`query` and `key` must have the same rank, got shapes "
                     f"query={tuple(query.shape)}, key={tuple(key.shape)}.")
  if query.ndim == 3 and key.shape[0] != query.shape[0]:
    raise ValueError("batch sizes of `query` and `key` differ: shapes "
                     f"query={tuple(query.shape)}, key={tuple(key.shape)}.")
  d = query.shape[-1]
  if key.shape[-1] != d:
    raise ValueError(f"`key` dim {key.shape[-1]} must equal `query` dim {d}: "
                     f"shapes query={tuple(query.shape)}, "
                     f"key={tuple(key.shape)}.")
  if qk_weights.ndim != 3 or qk_weights.shape[1:] != (d, d):
    raise ValueError(f"`qk_weights` must have shape [heads, {d}, {d}] for "
                     f"query/key dim {d}, got shape {tuple(qk_weights.shape)}.")
  if mask is not None:
    if mask.dtype != jnp.bool_:
      raise ValueError(f"`mask` must be boolean (True = attend), got dtype "
                       f"{mask.dtype}.")
    b = query.shape[0] if query.ndim == 3 else 1
    target = (b, query.shape[-2], key.shape[-2])
    shape = tuple(mask.shape)
    ok = len(shape) <= 3 and all(
        s in (1, t) for s, t in zip(reversed(shape), reversed(target)))
    if not ok:
      raise ValueError(f"`mask` with shape {shape} is not broadcastable to "
                       f"[batch, q_len, kv_len]={target}.")


def _check_values(values, d):
  if not jnp.issubdtype(values.dtype, jnp.floating):
    raise ValueError(f"`values` must be floating point, got dtype "
                     f"{values.dtype}.")
  if values.ndim != 3 or values.shape[1] != d:
    raise ValueError(f"`values` must have shape [heads, {d}, out] for "
                     f"query/key dim {d}, got shape {tuple(values.shape)}.")


def _compute_dtype(*xs):
  return jnp.float64 if any(x.dtype == jnp.float64 for x in xs) else jnp.float32


# ----------------------------------------------------------------------------
# Primitive.

def random_feature_attention_features(query, key, qk_weights, *,
                                      nonlinearity: str = "relu",
                                      mask=None):
  """Random attention features phi[b, t, m, :] = sum_i a_m(b, t)_i key[b, i].

  Args:
    query: `[B, T, D]` (or `[T, D]`).
    key: `[B, S, D]` (or `[S, D]`).
    qk_weights: frozen per-head bilinear forms `[M, D, D]`; the logit of head
      m is `query^T W_m key`.
    nonlinearity: "relu" (sigma = ReLU, averaged over the attended keys, the
      paper's model) or "softmax" (softmax over the attended keys).
    mask: optional bool, broadcastable to `[B, T, S]`, True = attend.

  Returns:
    `[B, T, M, D]` (or `[T, M, D]`) in the compute dtype (float32, or float64
    for float64 inputs).
  """
  _check_inputs(query, key, qk_weights, mask, nonlinearity)
  unbatched = query.ndim == 2
  if unbatched:
    query, key = query[None], key[None]
    if mask is not None and mask.ndim == 3:
      raise ValueError("`mask` must have rank <= 2 for unbatched inputs, got "
                       f"shape {tuple(mask.shape)}.")
  ct = _compute_dtype(query, key, qk_weights)
  q = query.astype(ct)
  k = key.astype(ct)
  w = qk_weights.astype(ct)
  # Contract the query with each head's form first: [B, T, M, D], then the
  # keys: [B, T, M, S]. Cost B*T*M*D*(D + S).
  qw = jnp.einsum("btd,mde->btme", q, w)
  logits = jnp.einsum("btme,bse->btms", qw, k)
  b, t, _, s = logits.shape
  if mask is None:
    valid = jnp.ones((b, t, s), dtype=bool)
  else:
    valid = jnp.broadcast_to(mask, (b, t, s))
  valid = valid[:, :, None, :]                                 # [B, T, 1, S]
  if nonlinearity == "relu":
    count = jnp.sum(valid, axis=-1, keepdims=True).astype(ct)
    a = jnp.where(valid, jax.nn.relu(logits), 0.0)
    a = a / jnp.maximum(count, 1.0)
  else:
    neg = jnp.finfo(ct).min
    z = jnp.where(valid, logits, neg)
    zmax = jnp.max(z, axis=-1, keepdims=True)
    e = jnp.where(valid, jnp.exp(z - jax.lax.stop_gradient(zmax)), 0.0)
    denom = jnp.sum(e, axis=-1, keepdims=True)
    a = e / jnp.where(denom > 0, denom, 1.0)
  feats = jnp.einsum("btms,bse->btme", a, k)
  return feats[0] if unbatched else feats


def random_feature_attention(query, key, qk_weights, values, *,
                             nonlinearity: str = "relu", mask=None):
  """Random-feature attention output `sum_m sum_i a_m,i <v_m, key_i>`.

  Args:
    query, key, qk_weights, nonlinearity, mask: as in
      `random_feature_attention_features`.
    values: trainable value vectors `[M, D, O]` (O outputs per query).

  Returns:
    `[B, T, O]` (or `[T, O]`) in the dtype of `query`.
  """
  _check_inputs(query, key, qk_weights, mask, nonlinearity)
  _check_values(values, query.shape[-1])
  if values.shape[0] != qk_weights.shape[0]:
    raise ValueError(f"`values` has {values.shape[0]} heads but `qk_weights` "
                     f"has {qk_weights.shape[0]}: shapes "
                     f"values={tuple(values.shape)}, "
                     f"qk_weights={tuple(qk_weights.shape)}.")
  feats = random_feature_attention_features(
      query, key, qk_weights, nonlinearity=nonlinearity, mask=mask)
  out = jnp.einsum("...me,meo->...o", feats, values.astype(feats.dtype))
  return out.astype(query.dtype)


def random_feature_attention_reference(query, key, qk_weights, values, *,
                                       nonlinearity: str = "relu", mask=None):
  """Plain-jnp reference: materializes every head's logits in one einsum."""
  _check_inputs(query, key, qk_weights, mask, nonlinearity)
  _check_values(values, query.shape[-1])
  unbatched = query.ndim == 2
  if unbatched:
    query, key = query[None], key[None]
  q = query.astype(jnp.float32)
  k = key.astype(jnp.float32)
  logits = jnp.einsum("btd,mde,bse->bmts", q, qk_weights.astype(jnp.float32), k)
  b, m, t, s = logits.shape
  valid = (jnp.ones((b, t, s), bool) if mask is None
           else jnp.broadcast_to(mask, (b, t, s)))[:, None]   # [B, 1, T, S]
  if nonlinearity == "relu":
    a = jnp.where(valid, jnp.maximum(logits, 0.0), 0.0)
    a = a / jnp.maximum(valid.sum(-1, keepdims=True), 1)
  else:
    a = jax.nn.softmax(jnp.where(valid, logits, -jnp.inf), axis=-1)
    a = jnp.where(valid, a, 0.0)
    a = jnp.nan_to_num(a)
  vk = jnp.einsum("bse,meo->bmso", k, values.astype(jnp.float32))
  out = jnp.einsum("bmts,bmso->bto", a, vk).astype(query.dtype)
  return out[0] if unbatched else out


def sample_qk_weights(rng, num_heads: int, dim: int, *,
                      mean: Union[str, Any] = "zero", mean_scale: float = 1.0,
                      std: float = 1.0, dtype=jnp.float32):
  """Draws `[num_heads, dim, dim]` i.i.d. matrices `mean + std * N(0, 1)`.

  `mean` is "zero", "identity" (`mean_scale * I`), or a `[dim, dim]` array.
  With unit-norm inputs, `x^T (std * G) y` is N(0, std^2).
  """
  if num_heads <= 0 or dim <= 0:
    raise ValueError(f"`num_heads` ({num_heads}) and `dim` ({dim}) must be "
                     "positive.")
  if std < 0:
    raise ValueError(f"`std` must be non-negative, got {std}.")
  if isinstance(mean, str):
    if mean not in MEANS:
      raise ValueError(f"`mean` must be one of {MEANS} or a [{dim}, {dim}] "
                       f"array, got {mean!r}.")
    mu = (jnp.zeros((dim, dim), dtype) if mean == "zero"
          else mean_scale * jnp.eye(dim, dtype=dtype))
  else:
    mu = jnp.asarray(mean, dtype)
    if mu.shape != (dim, dim):
      raise ValueError(f"`mean` array must have shape [{dim}, {dim}], got "
                       f"shape {tuple(mu.shape)}.")
  g = jax.random.normal(rng, (num_heads, dim, dim), dtype)
  return mu[None] + std * g


# ----------------------------------------------------------------------------
# NNX layer.

class FrozenRandom(nnx.Variable):
  """A non-trainable random draw (not an `nnx.Param`: optimizers over
  `nnx.Param` leave it alone; it is still part of `nnx.state`, so it is
  checkpointed)."""


class RandomFeatureAttention(nnx.Module):
  """Multi-head random-feature attention layer (frozen QK, trainable values).

  Args:
    num_heads: M, the number of random heads.
    in_features: D, the token dimension (query and keys).
    out_features: O, outputs per query (the paper: 1).
    qk_mean: "zero", "identity" (mean `mean_scale * I`) or a `[D, D]` array.
    mean_scale: scale of the identity mean.
    qk_std: standard deviation of each entry of W_m around the mean.
    nonlinearity: "relu" (paper) or "softmax".
    value_init: initializer of the values `[M, D, O]` (default zeros: the
      features are then fitted by ridge regression or gradient descent).
    rngs: `rngs.params()` draws the frozen matrices and the values.

  `layer.qk_weights` is a `FrozenRandom` variable; `layer.redraw(key)` draws
  new matrices from the same distribution. `layer.features(query, key)` gives
  the `[B, T, M, D]` features that the output is linear in;
  `layer.set_values_from_flat(w)` writes a fitted `[M * D * O]` vector back.
  """

  def __init__(self, num_heads: int, in_features: int, out_features: int = 1,
               *, qk_mean: Union[str, Any] = "zero", mean_scale: float = 1.0,
               qk_std: float = 1.0, nonlinearity: str = "relu",
               value_init=nnx.initializers.zeros_init(),
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    if nonlinearity not in NONLINEARITIES:
      raise ValueError(f"`nonlinearity` must be one of {NONLINEARITIES}, got "
                       f"{nonlinearity!r}.")
    if out_features <= 0:
      raise ValueError(f"`out_features` must be positive, got {out_features}.")
    self.num_heads = num_heads
    self.in_features = in_features
    self.out_features = out_features
    self.qk_mean = qk_mean if isinstance(qk_mean, str) else np.asarray(qk_mean)
    self.mean_scale = float(mean_scale)
    self.qk_std = float(qk_std)
    self.nonlinearity = nonlinearity
    self.param_dtype = param_dtype
    self.qk_weights = FrozenRandom(self._draw(rngs.params()))
    self.values = nnx.Param(value_init(
        rngs.params(), (num_heads, in_features, out_features), param_dtype))

  def _draw(self, rng):
    return sample_qk_weights(rng, self.num_heads, self.in_features,
                             mean=self.qk_mean, mean_scale=self.mean_scale,
                             std=self.qk_std, dtype=self.param_dtype)

  def redraw(self, rng) -> None:
    """Replaces the frozen matrices by a fresh draw under `rng`."""
    self.qk_weights.set_value(self._draw(rng))

  def features(self, query, key, *, mask=None):
    return random_feature_attention_features(
        query, key, self.qk_weights[...], nonlinearity=self.nonlinearity,
        mask=mask)

  def set_values_from_flat(self, flat) -> None:
    shape = (self.num_heads, self.in_features, self.out_features)
    flat = jnp.asarray(flat)
    if flat.size != int(np.prod(shape)):
      raise ValueError(f"`flat` must have {int(np.prod(shape))} entries "
                       f"(values shape {shape}), got shape {tuple(flat.shape)}.")
    self.values.set_value(flat.reshape(shape).astype(self.param_dtype))

  def __call__(self, query, key, *, mask=None):
    return random_feature_attention(
        query, key, self.qk_weights[...], self.values[...],
        nonlinearity=self.nonlinearity, mask=mask)
