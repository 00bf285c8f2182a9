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
import numpy as np
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


def stack_head_params(param_dicts):
  """Concatenates ICLAttention parameters of several models along heads.

  `param_dicts`: pure dicts of `ICLAttention` states ({'attn': {'query':
  {'kernel': [D, H_m, D]}, 'key', 'value', 'out': {'kernel': [H_m, D, T]}}}),
  all with the same D and T. Returns {'query', 'key', 'value': [D, N, D],
  'out': [N, D, T]} with N = sum_m H_m, heads in the order given.
  """
  if not param_dicts:
    raise ValueError("`param_dicts` must name at least one model.")
  get = lambda p, n: p["attn"][n]["kernel"]
  out = {n: jnp.concatenate([get(p, n) for p in param_dicts], axis=1)
         for n in ("query", "key", "value")}
  out["out"] = jnp.concatenate([get(p, "out") for p in param_dicts], axis=0)
  return out


def unstack_head_params(stacked, num_heads):
  """Inverse of `stack_head_params`: per-model pure dicts, H_m = num_heads[m]."""
  if sum(num_heads) != stacked["out"].shape[0]:
    raise ValueError(f"`num_heads` {list(num_heads)} must sum to the stacked "
                     f"head count {stacked['out'].shape[0]}.")
  res, s = [], 0
  for h in num_heads:
    res.append({"attn": {
        "query": {"kernel": stacked["query"][:, s:s + h]},
        "key": {"kernel": stacked["key"][:, s:s + h]},
        "value": {"kernel": stacked["value"][:, s:s + h]},
        "out": {"kernel": stacked["out"][s:s + h]}}})
    s += h
  return res


def stacked_icl_forward(stacked, z_query, z_context, *, scale: float,
                        head_kind, mask=None):
  """Per-head outputs of one-layer ICL attention, reassociated.

  Only the query token attends, so head h's prediction
  O_h V_h Z act(Z^T K_h^T Q_h z_q * scale) needs just the D-vector
  a_h = K_h^T Q_h z_q * scale (scores s_h = Z^T a_h) and the D-vector
  c_h = Z act(s_h) (output c_h^T V_h^T O_h^T): no projection of the L
  context tokens. Equal to `ICLAttention` (same parameters) up to float
  rounding; `tests/test_icl_regression.py` checks values and gradients.

  Args:
    stacked: {'query', 'key', 'value': [D, N, D], 'out': [N, D, T]} (e.g.
      from `stack_head_params`), N heads of any number of models.
    z_query: [B, D]; z_context: [B, L, D].
    scale: the logit scale (1/sqrt(D) in the paper).
    head_kind: length-N sequence (static) of 'softmax', 'linear' or
      'linear_norm' per head.
    mask: optional bool [B, L] (True = real context token).
  Returns:
    [B, N, T] float32: head h's contribution (sum the heads of a model).
  """
  wq, wk = stacked["query"], stacked["key"]
  wv, wo = stacked["value"], stacked["out"]
  n = wo.shape[0]
  kinds = tuple(head_kind)
  if len(kinds) != n or any(k not in ("softmax", "linear", "linear_norm")
                            for k in kinds):
    raise ValueError(f"`head_kind` must give one of 'softmax', 'linear', "
                     f"'linear_norm' for each of the {n} heads, got {kinds}.")
  D = wq.shape[0]
  if z_query.ndim != 2 or z_context.ndim != 3 or z_query.shape[-1] != D or \
      z_context.shape[-1] != D or z_context.shape[0] != z_query.shape[0]:
    raise ValueError(f"`z_query` [B, D] and `z_context` [B, L, D] with D = "
                     f"{D} expected, got {z_query.shape}, "
                     f"{z_context.shape}.")
  zq = z_query.astype(jnp.float32)
  zc = z_context.astype(jnp.float32)
  kq = jnp.einsum("anh,bnh->nab", wq, wk) * scale     # z_q^T kq_h z
  vo = jnp.einsum("anh,nht->nat", wv, wo)             # z^T vo_h
  a = jnp.einsum("ba,nac->bnc", zq, kq)               # [B, N, D]
  s = jnp.einsum("blc,bnc->bnl", zc, a)               # [B, N, L]
  is_soft = np.array([k == "softmax" for k in kinds])
  is_norm = np.array([k == "linear_norm" for k in kinds])
  w = s
  if is_soft.any():
    sm = jnp.where(mask[:, None, :], s, -1e30) if mask is not None else s
    sm = jax.nn.softmax(sm, axis=-1)
    w = jnp.where(is_soft[None, :, None], sm, s) if not is_soft.all() else sm
  if mask is not None:       # masked slots never reach the output
    w = jnp.where(mask[:, None, :], w, 0.0)
  if is_norm.any():
    count = (jnp.sum(mask, axis=-1).astype(jnp.float32)[:, None, None]
             if mask is not None else float(zc.shape[1]))
    w = jnp.where(is_norm[None, :, None], w / jnp.maximum(count, 1.0), w)
  c = jnp.einsum("bnl,bla->bna", w, zc)               # [B, N, D]
  return jnp.einsum("bna,nat->bnt", c, vo)


__all__ = ["ICLAttention", "icl_prediction_reference", "linear_icl_attention",
           "stack_head_params", "stacked_icl_forward", "torch_linear_init",
           "unstack_head_params"]
