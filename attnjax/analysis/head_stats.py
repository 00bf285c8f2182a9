"""Per-head statistics of recorded attention maps.

Inputs are attention probabilities `[B, N, T, S]` (batch, heads, queries,
keys; rows sum to 1, or to 0 for masked rows), e.g. the values of
`attnjax.models.vision.attention_maps(model, images)`, or a dict
`{layer_path: [B, N, T, S]}` of them for the per-layer functions.

* `attention_entropy`: Shannon entropy (nats) of every query's distribution,
  [B, N, T]; `head_entropy` averages it per head.
* `effective_rank`: Roy & Vetterli (2007) effective rank of each head's
  [T, S] map, exp(H(sigma / sum sigma)) over its singular values, [B, N].
* `sink_scores`: mean attention each key receives over the queries,
  [B, N, S] (score of a given `token` if passed: [B, N]). `sink_rate`: the
  fraction of (layer, head) pairs whose batch-mean score of `token` exceeds
  `eps` (the attention-sink metric of Gu et al. 2024, "When Attention Sink
  Emerges in Language Models", eps = 0.3).
* `head_divergence`: mean over queries of the Jensen-Shannon divergence
  (nats) between the distributions of every pair of heads, [B, N, N].
* `gate_importance`: Michel et al. (2019) importance |dL/d xi_h| of head
  gates xi (all ones) for a loss that takes the gates (models with
  attnjax layers: `attnjax.analysis.head_gates.head_importance`).
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import jax
import jax.numpy as jnp

__all__ = ["attention_entropy", "head_entropy", "effective_rank",
           "sink_scores", "sink_rate", "head_divergence", "gate_importance",
           "check_maps", "ordered_layers"]


def check_maps(maps, name: str = "maps"):
  """Validates an attention-map array [B, N, T, S]; returns it as float32."""
  if not hasattr(maps, "ndim") or maps.ndim != 4:
    raise ValueError(f"`{name}` must be attention probabilities [batch, heads,"
                     f" queries, keys], got shape "
                     f"{getattr(maps, 'shape', type(maps))}.")
  return jnp.asarray(maps, jnp.float32)


def ordered_layers(layer_maps: Dict[str, jax.Array]):
  """[(path, map)] in network order: paths compared by their integer parts
  ('blocks/10' after 'blocks/9')."""
  def key(p):
    return [(0, int(t), "") if t.isdigit() else (1, 0, t)
            for t in str(p).split("/")]
  return sorted(layer_maps.items(), key=lambda kv: key(kv[0]))


def _xlogx(p):
  return jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)


def attention_entropy(maps):
  """Entropy (nats) of each query's attention distribution: [B, N, T]."""
  return -jnp.sum(_xlogx(check_maps(maps)), -1)


def head_entropy(maps):
  """Mean entropy per head over batch and queries: [N]."""
  return attention_entropy(maps).mean((0, 2))


def effective_rank(maps, eps: float = 1e-12):
  """exp(entropy of normalized singular values) of each [T, S] map: [B, N]."""
  s = jnp.linalg.svd(check_maps(maps), compute_uv=False)
  p = s / jnp.maximum(s.sum(-1, keepdims=True), eps)
  return jnp.exp(-jnp.sum(_xlogx(p), -1))


def sink_scores(maps, token: Optional[int] = None):
  """Mean attention received by each key over the queries: [B, N, S], or
  [B, N] for key `token`."""
  m = check_maps(maps)
  score = m.mean(2)
  if token is None:
    return score
  if not -m.shape[-1] <= token < m.shape[-1]:
    raise ValueError(f"`token` {token} out of range for {m.shape[-1]} keys.")
  return score[..., token]


def sink_rate(layer_maps: Dict[str, jax.Array], token: int = 0,
              eps: float = 0.3):
  """Fraction of (layer, head) pairs with batch-mean sink score of `token`
  above `eps`; also returns {layer: [N] scores}."""
  if not layer_maps:
    raise ValueError("`layer_maps` is empty.")
  per = {p: sink_scores(m, token).mean(0) for p, m in ordered_layers(layer_maps)}
  flags = jnp.concatenate([v > eps for v in per.values()])
  return float(flags.mean()), per


def head_divergence(maps, eps: float = 1e-12):
  """Jensen-Shannon divergence (nats) between heads, mean over queries:
  [B, N, N] (symmetric, zero diagonal, <= log 2)."""
  m = check_maps(maps)
  p, q = m[:, :, None], m[:, None, :]              # [B, N, 1, T, S], [B, 1, N, ...]
  mid = 0.5 * (p + q)
  kl = lambda a: jnp.sum(jnp.where(a > 0, a * (jnp.log(jnp.maximum(a, eps))
                                               - jnp.log(jnp.maximum(mid, eps))),
                                   0.0), -1)
  return (0.5 * kl(p) + 0.5 * kl(q)).mean(-1)


def gate_importance(loss_fn: Callable, gate_shape, *, normalize: bool = True):
  """Michel et al. (2019) head importance: |dL/d xi| at xi = 1, where
  `loss_fn(gates)` runs the model with every head's output multiplied by
  `gates[..., h]` (shape `gate_shape`, e.g. [layers, heads]). With
  `normalize`, each layer (last axis) is divided by its L2 norm, as in the
  paper."""
  g = jnp.abs(jax.grad(loss_fn)(jnp.ones(gate_shape, jnp.float32)))
  if normalize:
    g = g / jnp.maximum(jnp.linalg.norm(g, axis=-1, keepdims=True), 1e-20)
  return g
