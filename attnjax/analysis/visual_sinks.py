"""Visual attention sinks (Kang, Kim, Kim & Hwang, ICLR 2025, "See What You
Are Told: Visual Attention Sink in Large Multimodal Models", arXiv
2503.03321).

Visual sink tokens are image tokens with massive activation in a few fixed
hidden dimensions, the "sink dimensions" D_sink that the language model's
own sink tokens (BOS, '.', '\\n') light up ({1415, 2533} for LLaMA-2-7B).
They draw high attention whatever the text asks, and removing them does not
change the answer.

* `rms_normalized(hidden)`: |x| / RMS(x) per token (RMSNorm without its
  weight, eps 1e-6 as in LLaMA), [..., T, D].
* `sink_dimension_values(hidden, dims)`: the paper's
  phi(x) = max_{d in D_sink} |x_d| / RMS(x), [..., T]. Note
  phi(x) <= sqrt(D): the paper's threshold tau = 20 is for D = 4096
  (sqrt(D) = 64); smaller models need a proportionally smaller tau.
* `find_sink_dimensions(hidden, reference, num_dims=2)`: sink-dimension
  discovery: the dimensions where the reference sink tokens (e.g. BOS or
  CLS) have the largest mean RMS-normalized magnitude (averaged over every
  leading axis: layers, batch). Returns (dims [num_dims] by decreasing
  score, scores [D]).
* `visual_sink_tokens(hidden, dims, tau=20.0, visual=None)`: per-token sink
  flag phi(x) > tau (strict, as the authors' DimProspector), restricted to
  the `visual` tokens when given ([T] bool).
* `visual_sink_attention(maps, sink, visual)`: per head and query, the
  attention on the image sum_{j in V} a_ij and the visual non-sink ratio
  r = sum_{j in V, not sink} a_ij / sum_{j in V} a_ij. `image_centric_heads`
  marks the (head, query) pairs whose image attention >= `min_visual` (0.2)
  and r >= `rho` (0.5): the heads VAR redistributes sink attention in (the
  authors' code writes the same test as sink share <= 1 - rho).
* `hidden_states(model, images)`: {block path: [B, T, C]} residual-stream
  inputs of every attention Block of an attnjax vision model (the hidden
  states phi is measured on), recorded on a view like `attention_maps`.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.analysis.head_stats import check_maps

__all__ = ["rms_normalized", "sink_dimension_values", "find_sink_dimensions",
           "visual_sink_tokens", "visual_sink_attention",
           "image_centric_heads", "hidden_states"]


def _hidden(hidden, name="hidden"):
  h = jnp.asarray(hidden)
  if h.ndim < 2:
    raise ValueError(f"`{name}` must be hidden states [..., tokens, dim], got "
                     f"shape {h.shape}.")
  return h.astype(jnp.float32)


def rms_normalized(hidden, eps: float = 1e-6):
  """|x| / sqrt(mean(x^2) + eps) per token: [..., T, D]."""
  h = _hidden(hidden)
  return jnp.abs(h) * jax.lax.rsqrt(jnp.mean(h * h, -1, keepdims=True) + eps)


def _dims(dims, d):
  idx = np.asarray(dims, np.int64).reshape(-1)
  if idx.size == 0 or idx.min() < -d or idx.max() >= d:
    raise ValueError(f"`dims` must be non-empty indices into {d} hidden "
                     f"dimensions, got {idx.tolist()}.")
  return idx


def sink_dimension_values(hidden, dims: Sequence[int], eps: float = 1e-6):
  """phi(x) = max over sink dimensions of the RMS-normalized |x_d|:
  [..., T]."""
  r = rms_normalized(hidden, eps)
  return jnp.max(r[..., _dims(dims, r.shape[-1])], -1)


def find_sink_dimensions(hidden, reference=0, num_dims: int = 2,
                         eps: float = 1e-6):
  """(dims, scores): the `num_dims` dimensions with the largest mean
  RMS-normalized magnitude over the `reference` tokens (int or list of
  token indices), and the per-dimension scores [D]."""
  r = rms_normalized(hidden, eps)
  t, d = r.shape[-2:]
  ref = np.asarray(reference, np.int64).reshape(-1)
  if ref.size == 0 or ref.min() < -t or ref.max() >= t:
    raise ValueError(f"`reference` must index the {t} tokens, got "
                     f"{ref.tolist()}.")
  if not 1 <= num_dims <= d:
    raise ValueError(f"`num_dims` must be in [1, {d}], got {num_dims}.")
  scores = np.asarray(r[..., ref, :].reshape(-1, d).mean(0), np.float64)
  dims = np.argsort(-scores, kind="stable")[:num_dims]
  return dims, scores


def _visual_mask(visual, t):
  if visual is None:
    return np.ones(t, bool)
  v = np.asarray(visual)
  if v.dtype != bool:
    mask = np.zeros(t, bool)
    mask[v.astype(np.int64)] = True
    v = mask
  if v.shape != (t,):
    raise ValueError(f"`visual` must be a [tokens]={t} bool mask or token "
                     f"indices, got shape {v.shape}.")
  return v


def visual_sink_tokens(hidden, dims: Sequence[int], tau: float = 20.0,
                       visual=None, eps: float = 1e-6):
  """[..., T] bool: phi(x) > tau, only for `visual` tokens when given."""
  phi = sink_dimension_values(hidden, dims, eps)
  return (phi > tau) & jnp.asarray(_visual_mask(visual, phi.shape[-1]))


def visual_sink_attention(maps, sink, visual=None):
  """(image attention [B, N, T], visual non-sink ratio [B, N, T]) of
  attention probabilities `maps` [B, N, T, S]; `sink` [B, S] or [S] bool,
  `visual` [S] bool / indices (default all keys). Ratio 0 where a query
  pays no attention to the image."""
  m = check_maps(maps)
  s = m.shape[-1]
  vis = jnp.asarray(_visual_mask(visual, s))
  sink = jnp.asarray(sink, bool)
  if sink.shape not in ((s,), (m.shape[0], s)):
    raise ValueError(f"`sink` must be [keys]={s} or [batch, keys]="
                     f"{(m.shape[0], s)} bool, got {sink.shape}.")
  sink = jnp.broadcast_to(sink, (m.shape[0], s))[:, None, None, :]
  image = jnp.sum(jnp.where(vis, m, 0.0), -1)
  non_sink = jnp.sum(jnp.where(vis & ~sink, m, 0.0), -1)
  ratio = jnp.where(image > 0, non_sink / jnp.where(image > 0, image, 1.0), 0.0)
  return image, ratio


def image_centric_heads(maps, sink, visual=None, rho: float = 0.5,
                        min_visual: float = 0.2):
  """[B, N, T] bool: image attention >= min_visual and visual non-sink
  ratio >= rho."""
  image, ratio = visual_sink_attention(maps, sink, visual)
  return (image >= min_visual) & (ratio >= rho)


def hidden_states(model, images) -> Dict[str, jax.Array]:
  """{block path: [B, T, C] (or [B, H, W, C])}: the input of every attention
  Block of an attnjax vision model, from a recording view (the model is
  not modified)."""
  from attnjax.models.vision.attention_maps import recorded
  return recorded(model, images, "block_input")
