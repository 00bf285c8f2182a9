"""One-layer multi-head attention for in-context linear regression.

The model of He, Pan, Chen & Yang, "In-Context Linear Regression Demystified:
Training Dynamics and Mechanistic Interpretability of Multi-Head Softmax
Attention" (ICML 2025, arXiv 2503.12734):

    TF(Z, z_q) = sum_h O_h V_h Z softmax(Z^T K_h^T Q_h z_q / sqrt(d + 1))

with context tokens Z = [z_1 .. z_L], z_i = (x_i, y_i) in R^{d+1}, query token
z_q = (x_q, 0), and per-head full (d+1)x(d+1) Q_h, K_h, V_h and a 1x(d+1)
output row O_h. The query attends only to the L context tokens (it is passed
as the cross-attention query; the context is key/value), no positional
encoding. It is `attnjax.MultiHeadAttention(num_heads=H, in_features=D,
head_dim=D, out_features=n_out, use_bias=False)` with D = d + 1 (or d + T for
T tasks) and the scale 1/sqrt(D).

`attention="linear"` removes the softmax (the paper's linear-transformer
comparison): TF = sum_h O_h V_h Z Z^T K_h^T Q_h z_q / sqrt(d+1), via
`linear_icl_attention`; `attention="linear_norm"` also divides by the number
of context tokens L (the 1/L-normalized linear attention common in the ICL
literature).
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax.nn import MultiHeadAttention
from attnjax.softmax import dot_product_attention

# PyTorch nn.Linear's default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), which
# the paper's code uses: variance 1/(3 fan_in).
torch_linear_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in",
                                                      "uniform")


def linear_icl_attention(query, key, value, mask=None, *, scale: float,
                         normalize_by_length: bool = False):
  """Softmax-free attention: out_t = sum_s (scale q_t.k_s) v_s [/ #keys].

  query [B, T, N, H], key [B, S, N, H], value [B, S, N, Hv]; mask (bool,
  True = attend) broadcastable to [B, N, T, S]. With `normalize_by_length`
  the sum is divided by the number of attended keys (the 1/L of the linear
  transformers in the ICL literature), so the output does not grow with L.
  Computed in float32, returned in query.dtype.
  """
  if query.ndim != 4 or key.ndim != 4 or value.ndim != 4:
    raise ValueError(
        "`query`, `key`, `value` must be rank 4 [B, T|S, heads, dim], got "
        f"shapes {query.shape}, {key.shape}, {value.shape}.")
  if key.shape[2] != query.shape[2] or value.shape[:3] != key.shape[:3]:
    raise ValueError(
        "`key`/`value` must have the query's heads and matching [B, S, heads], "
        f"got query {query.shape}, key {key.shape}, value {value.shape}.")
  q = query.astype(jnp.float32)
  k = key.astype(jnp.float32)
  v = value.astype(jnp.float32)
  s = jnp.einsum("btnh,bsnh->bnts", q, k) * scale
  if mask is not None:
    m = jnp.broadcast_to(mask, s.shape)
    s = jnp.where(m, s, 0.0)
    count = jnp.sum(m, axis=-1, keepdims=True).astype(jnp.float32)
  else:
    count = jnp.full(s.shape[:-1] + (1,), float(s.shape[-1]), jnp.float32)
  if normalize_by_length:
    s = s / jnp.maximum(count, 1.0)
  out = jnp.einsum("bnts,bsnh->btnh", s, v)
  return out.astype(query.dtype)


class ICLAttention(nnx.Module):
  """One attention layer; the query token cross-attends to the context.

  Args:
    d: covariate dimension.
    num_heads: H.
    num_tasks: number of responses per token (1 for plain regression; the
      multi-task study uses 2). Token width D = d + num_tasks.
    attention: 'softmax' (the paper's model), 'linear' (softmax removed) or
      'linear_norm' (softmax removed, scores divided by L).
    scale: logit scale, default 1/sqrt(d + 1) as in the paper (for the
      multi-task model the paper's code uses 1/sqrt(D)).
    kernel_init: initializer of all four projections; default PyTorch's
      nn.Linear init (the paper's code).
  """

  def __init__(self, d: int, num_heads: int, *, num_tasks: int = 1,
               attention: str = "softmax", scale: Optional[float] = None,
               kernel_init=torch_linear_init, rngs: nnx.Rngs):
    if d <= 0 or num_heads <= 0 or num_tasks <= 0:
      raise ValueError(
          f"`d` ({d}), `num_heads` ({num_heads}) and `num_tasks` "
          f"({num_tasks}) must be positive.")
    width = d + num_tasks
    self.d = d
    self.num_tasks = num_tasks
    self.width = width
    self.num_heads = num_heads
    self.attention = attention
    self.scale = float(1.0 / math.sqrt(width) if scale is None else scale)
    if attention == "softmax":
      fn = functools.partial(dot_product_attention, scale=self.scale,
                             implementation="xla")
    elif attention in ("linear", "linear_norm"):
      fn = functools.partial(linear_icl_attention, scale=self.scale,
                             normalize_by_length=attention == "linear_norm")
    else:
      raise ValueError("`attention` must be 'softmax', 'linear' or "
                       f"'linear_norm', got {attention!r}.")
    self.attn = MultiHeadAttention(
        num_heads, width, out_features=num_tasks, head_dim=width,
        use_bias=False, attention_fn=fn, kernel_init=kernel_init, rngs=rngs)

  def __call__(self, z_query, z_context, *, mask=None):
    """z_query [B, D] or [B, 1, D]; z_context [B, L, D] -> [B, num_tasks].

    `mask` (bool [B, L], True = real context token) lets one batch hold
    prompts of different lengths.
    """
    if z_query.ndim == 2:
      z_query = z_query[:, None, :]
    if z_query.ndim != 3 or z_query.shape[1] != 1:
      raise ValueError(
          f"`z_query` must be [B, D] or [B, 1, D], got shape {z_query.shape}.")
    if z_context.ndim != 3 or z_context.shape[-1] != self.width:
      raise ValueError(
          f"`z_context` must be [B, L, {self.width}], got shape "
          f"{z_context.shape}.")
    kw = {}
    if mask is not None:
      kw["mask"] = mask[:, None, None, :]
    out = self.attn(z_query, z_context, **kw)
    return out[:, 0, :]

  def merged_matrices(self):
    """Paper-orientation merged matrices.

    Returns (KQ [H, D, D], OV [H, D, n_out]) with KQ_h = K_h^T Q_h * scale
    (the score of context token z on query z_q is z^T KQ_h z_q) and
    OV_h = V_h^T O_h^T (a context token adds z^T OV_h to the output).
    """
    kq, ov = self.attn.merged_matrices()   # kq[h] = W_Q W_K^T: [in_q, in_kv]
    return jnp.swapaxes(kq, -1, -2) * self.scale, ov


def icl_prediction_reference(kq, ov, z_query, z_context, attention="softmax"):
  """Plain-jnp model formula from merged matrices (for tests/analysis).

  kq [H, D, D] (paper orientation, scale included), ov [H, D, n_out],
  z_query [B, D], z_context [B, L, D] -> [B, n_out].
  """
  scores = jnp.einsum("bld,hde,be->bhl", z_context, kq, z_query)
  if attention == "softmax":
    w = jax.nn.softmax(scores, axis=-1)
  elif attention == "linear":
    w = scores
  else:
    w = scores / z_context.shape[1]
  return jnp.einsum("bhl,bld,hdo->bo", w, z_context, ov)


__all__ = ["ICLAttention", "icl_prediction_reference", "linear_icl_attention",
           "torch_linear_init"]
