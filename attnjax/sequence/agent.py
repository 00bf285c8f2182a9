"""Agent attention (Han et al. 2024, "Agent Attention: On the Integration of
Softmax and Linear Attention"), 1D sequences.

A small set of agent tokens A [n_agents] -- by default adaptive average
pooling of the queries over the sequence -- first aggregates from the keys
and values, then broadcasts back to the queries, both by softmax:

  V_A = softmax(scale A K^T) V          (agent aggregation)
  out = softmax(scale Q A^T) V_A        (agent broadcast)

Cost O((T + S) n_agents H). The paper's agent bias and depth-wise
convolution on V are left to the layer (not included here).

Causal forms are not supported: agents pooled from all queries mix future
positions into every output.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.sequence import _common
from attnjax.sequence._common import to_groups
from attnjax.softmax import dot_product_attention

SUPPORT = {
    "noncausal_self": True, "causal_self": False,
    "noncausal_cross": True, "causal_cross": False,
}
_CAUSAL_WHY = (
    "agent_attention has no causal form: its agent tokens are pooled from "
    "(and aggregate over) the "
    "whole sequence, so every output depends on future positions.")


def adaptive_pool_matrix(length: int, num_out: int) -> np.ndarray:
  """[num_out, length] averaging matrix of adaptive average pooling.

  Output i averages positions floor(i L / n) .. ceil((i + 1) L / n) - 1
  (as torch.nn.AdaptiveAvgPool1d).
  """
  p = np.zeros((num_out, length), np.float32)
  for i in range(num_out):
    lo = (i * length) // num_out
    hi = -(-((i + 1) * length) // num_out)
    p[i, lo:hi] = 1.0 / (hi - lo)
  return p


# Positions per loop step. Whole-sequence passes (the [n_agents, S] agent
# logits and their softmax over S, the [T, n_agents] broadcast logits, the
# pooling contraction over T) fall out of cache as the length grows: CPU
# time per position doubled from 4096 to 16384 (issue 22). Groups of this
# many positions stay in cache, so time is linear in length.
_TOKENS_PER_STEP = 128


def pool_agents(query, num_agents: int):
  """Agent tokens [B, n_agents, N, H] pooled from query [B, T, N, H].

  Accumulated over groups of query positions (a scan carrying only the
  [B, n_agents, N, H] float32 sums), so the pooling is linear in T in
  practice too.
  """
  b, t = query.shape[:2]
  if num_agents > t:
    raise ValueError(
        f"`num_agents` ({num_agents}) must be <= q_len ({t}) to pool agents "
        f"from `query` of shape {query.shape}.")
  step = min(_TOKENS_PER_STEP, t)
  padded = _common.round_up(t, step)
  p = np.pad(adaptive_pool_matrix(t, num_agents), ((0, 0), (0, padded - t)))
  p = jnp.asarray(
      p.reshape(num_agents, padded // step, step).transpose(1, 0, 2))

  def add(acc, xs):
    pg, qg = xs
    return acc + jnp.einsum("al,blnh->banh", pg, qg.astype(jnp.float32)), None

  init = jnp.zeros((b, num_agents) + query.shape[2:], jnp.float32)
  pooled, _ = jax.lax.scan(jax.checkpoint(add), init,
                           (p, to_groups(query, step)))
  return pooled.astype(query.dtype)


def _check(query, key, value, num_agents, agents, mask, is_causal, bias,
           dropout_rate):
  if is_causal:
    raise NotImplementedError(_CAUSAL_WHY)
  _common.reject("bias", bias, "agent_attention", "the [T, S] scores are "
                 "never formed.")
  _common.reject("dropout_rate", dropout_rate, "agent_attention",
                 "attention dropout is not implemented.")
  query, key, value, dims, unbatched = _common.prepare_qkv(query, key, value)
  b, t, n, s, k, h, hv = dims
  kv_mask = _common.key_padding_mask(mask, b, n, t, s,
                                     mechanism="agent_attention",
                                     unbatched=unbatched)
  # Masked slots are zeroed by a select, so NaN/Inf there reaches nothing.
  key = _common.zero_masked(key, kv_mask)
  value = _common.zero_masked(value, kv_mask)
  if agents is None:
    if num_agents is None:
      raise ValueError("give `num_agents` (pooled from queries) or `agents`.")
    num_agents = _common.check_positive_int("num_agents", num_agents)
    agents = pool_agents(query, num_agents)
  else:
    agents = jnp.asarray(agents)
    if unbatched and agents.ndim == 3:
      agents = agents[None]
    if agents.ndim != 4 or agents.shape[0] not in (1, b) or agents.shape[2:] != (n, h):
      raise ValueError(
          f"`agents` must have shape [B|1, n_agents, {n}, {h}], got "
          f"{agents.shape} (query {query.shape}).")
    agents = jnp.broadcast_to(agents, (b,) + agents.shape[1:])
  return query, key, value, dims, unbatched, kv_mask, agents


def _softmax_rows(logits, ok=None):
  return _common.masked_softmax(logits, ok)


def agent_attention(query, key, value, *, num_agents: Optional[int] = None,
                    agents=None, is_causal: bool = False,
                    scale: Optional[float] = None, mask=None, bias=None,
                    dropout_rate: float = 0.0, dropout_rng=None):
  """Agent attention.

  Args:
    query: [B, T, N, H] (or [T, N, H]); key: [B, S, K, H]; value [B, S, K, Hv].
    num_agents: agents pooled from the queries (adaptive average pooling).
    agents: explicit agent tokens [B|1, n_agents, N, H] instead (e.g. learned).
    is_causal: must be False (NotImplementedError).
    scale: default 1/sqrt(H), used in both softmaxes.
    mask: key-padding mask broadcastable to [B, 1, 1, S]; with no valid key
      the output is zero.

  Returns:
    [B, T, N, Hv] in query.dtype.
  """
  del dropout_rng
  query, key, value, dims, unbatched, kv_mask, agents = _check(
      query, key, value, num_agents, agents, mask, is_causal, bias,
      dropout_rate)
  if (empty := _common.empty_output(dims, query.dtype, unbatched)) is not None:
    return empty
  b, t, n, s, k, h, hv = dims
  g = n // k
  scale = _common.default_scale(scale, h)
  f32 = jnp.float32
  neg = _common.NEG
  na = agents.shape[1]
  a = agents.astype(f32).reshape(b, na, k, g, h)  # not -1: B may be 0
  # Agent aggregation: one pass over groups of keys, an online softmax over
  # key positions (running max m, sum l and V_A accumulator acc, rescaled
  # when m grows); only these [B, K, G, n_agents(, Hv)] values are carried.
  step_k = min(_TOKENS_PER_STEP, s)
  valid = jnp.arange(_common.round_up(s, step_k)) < s
  if kv_mask is not None:
    valid = valid[None] & jnp.pad(kv_mask, ((0, 0), (0, valid.shape[0] - s)))
  valid = jnp.broadcast_to(valid, (b, valid.shape[-1]))

  def aggregate(carry, xs):
    m, l, acc = carry
    kg, vg, ok = xs
    okb = ok[:, None, None, None, :]
    x = jnp.einsum("bakgh,blkh->bkgal", a, kg.astype(f32)) * scale
    x = jnp.where(okb, x, neg)
    m_new = jax.lax.stop_gradient(jnp.maximum(m, jnp.max(x, axis=-1)))
    had = m > 0.5 * neg
    shrink = jnp.where(had, jnp.exp(jnp.where(had, m - m_new, 0.0)), 0.0)
    base = jnp.where(m_new > 0.5 * neg, m_new, 0.0)[..., None]
    p = jnp.where(okb, jnp.exp(jnp.where(okb, x - base, 0.0)), 0.0)
    l = l * shrink + jnp.sum(p, axis=-1)
    acc = acc * shrink[..., None] + jnp.einsum("bkgal,blkd->bkgad", p,
                                               vg.astype(f32))
    return (m_new, l, acc), None

  init = (jnp.full((b, k, g, na), neg, f32), jnp.zeros((b, k, g, na), f32),
          jnp.zeros((b, k, g, na, hv), f32))
  # jax.checkpoint: the backward pass recomputes a group's logits from its
  # inputs instead of storing them for every group.
  (_, l, acc), _ = jax.lax.scan(
      jax.checkpoint(aggregate), init,
      (to_groups(key, step_k), to_groups(value, step_k),
       to_groups(valid, step_k)))
  ok = l > 0                        # no valid key: V_A = 0, output zeros
  va = jnp.where(ok[..., None], acc / jnp.where(ok, l, 1.0)[..., None], 0.0)
  # Agent broadcast, per group of queries (softmax over the agents).
  step_q = min(_TOKENS_PER_STEP, t)

  def broadcast(_, qg):
    bc = jnp.einsum("blkgh,bakgh->blkga",
                    qg.astype(f32).reshape(b, step_q, k, g, h), a) * scale
    out = jnp.einsum("blkga,bkgad->blkgd", _softmax_rows(bc), va)
    return None, out.reshape(b, step_q, n, hv).astype(query.dtype)

  _, out = jax.lax.scan(jax.checkpoint(broadcast), None,
                        to_groups(query, step_q))
  out = jnp.moveaxis(out, 0, 1).reshape(b, _common.round_up(t, step_q), n,
                                         hv)[:, :t]
  return out[0] if unbatched else out


def agent_attention_reference(query, key, value, *,
                              num_agents: Optional[int] = None, agents=None,
                              is_causal: bool = False,
                              scale: Optional[float] = None, mask=None):
  """Two calls of the XLA softmax attention (agents as queries, then keys)."""
  query, key, value, dims, unbatched, kv_mask, agents = _check(
      query, key, value, num_agents, agents, mask, is_causal, None, 0.0)
  b, t, n, s, k, h, hv = dims
  f32 = jnp.float32
  m = None if kv_mask is None else kv_mask[:, None, None, :]
  va = dot_product_attention(agents.astype(f32), key.astype(f32),
                             value.astype(f32), mask=m, scale=scale,
                             implementation="xla")          # [b, a, n, hv]
  out = dot_product_attention(query.astype(f32), agents.astype(f32), va,
                              scale=scale, implementation="xla")
  out = out.astype(query.dtype)
  return out[0] if unbatched else out
