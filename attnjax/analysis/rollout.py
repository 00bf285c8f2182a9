"""Attention rollout and attention flow (Abnar & Zuidema 2020,
"Quantifying Attention Flow in Transformers") for ViTs.

Both take the per-layer attention maps of one forward pass, `[B, N, T, T]`
each (e.g. `ordered_layers(attention_maps(model, images))`), fuse the heads
(`head_fusion`: 'mean', 'max' or 'min'), and account for the residual
connection as `A' = 0.5 A + 0.5 I` (rows renormalized).

* `attention_rollout`: the product `A'_L ... A'_1`: [B, T, T], row t = how
  much output token t draws from each input token through all layers.
  `discard_ratio` zeroes that fraction of the smallest fused weights per
  layer first (the common ViT-rollout variant); the diagonal is kept.
* `attention_flow`: the max-flow value from output token t (top layer) to
  input token s (bottom layer) in the layered graph whose edge capacities
  are the A' weights: [B, T, T]. Exact (Edmonds-Karp in float64 NumPy); the
  graph has L*T edges per node, so keep T small (tens of tokens).
  `rows=[0]` computes only the cls token's row (T times cheaper).
"""

from __future__ import annotations

from collections import deque
from typing import Optional, Sequence

import jax.numpy as jnp
import numpy as np

from attnjax.analysis.head_stats import check_maps

__all__ = ["fuse_heads", "attention_rollout", "attention_flow"]


def fuse_heads(maps, head_fusion: str = "mean", residual: bool = True,
               discard_ratio: float = 0.0):
  """[B, N, T, T] -> [B, T, T]: fused over heads, optional discard, with the
  residual identity, rows renormalized."""
  m = check_maps(maps)
  if m.shape[-1] != m.shape[-2]:
    raise ValueError(f"rollout needs self-attention maps [B, N, T, T], got "
                     f"{tuple(m.shape)}.")
  if head_fusion == "mean":
    a = m.mean(1)
  elif head_fusion == "max":
    a = m.max(1)
  elif head_fusion == "min":
    a = m.min(1)
  else:
    raise ValueError(f"`head_fusion` must be 'mean', 'max' or 'min', got "
                     f"{head_fusion!r}.")
  if not 0.0 <= discard_ratio < 1.0:
    raise ValueError(f"`discard_ratio` must be in [0, 1), got {discard_ratio}.")
  t = a.shape[-1]
  if discard_ratio > 0:
    flat = a.reshape(a.shape[0], -1)
    k = int(flat.shape[-1] * discard_ratio)
    if k:
      thresh = jnp.sort(flat, -1)[:, k - 1:k]
      keep = flat > thresh
      keep = keep.reshape(a.shape) | jnp.eye(t, dtype=bool)[None]
      a = jnp.where(keep, a, 0.0)
  if residual:
    a = 0.5 * a + 0.5 * jnp.eye(t)[None]
  return a / jnp.maximum(a.sum(-1, keepdims=True), 1e-30)


def _layers(maps_per_layer):
  if isinstance(maps_per_layer, dict):
    from attnjax.analysis.head_stats import ordered_layers
    maps_per_layer = [m for _, m in ordered_layers(maps_per_layer)]
  maps_per_layer = list(maps_per_layer)
  if not maps_per_layer:
    raise ValueError("no attention maps given.")
  shapes = {tuple(np.shape(m))[-1] for m in maps_per_layer}
  if len(shapes) != 1:
    raise ValueError(f"every layer must have the same token count, got "
                     f"{sorted(shapes)}.")
  return maps_per_layer


def attention_rollout(maps_per_layer: Sequence, *, head_fusion: str = "mean",
                      residual: bool = True, discard_ratio: float = 0.0):
  """Rollout of layers given first to last (a list, or a dict of
  `attention_maps` ordered by path): [B, T, T]."""
  out = None
  for m in _layers(maps_per_layer):
    a = fuse_heads(m, head_fusion, residual, discard_ratio)
    out = a if out is None else jnp.einsum("bij,bjk->bik", a, out)
  return out


def _max_flow(cap, source, sink):
  """Edmonds-Karp on a dense float64 capacity matrix."""
  n = cap.shape[0]
  res = cap.copy()
  flow = 0.0
  while True:
    parent = np.full(n, -1)
    parent[source] = source
    q = deque([source])
    while q and parent[sink] < 0:
      u = q.popleft()
      for v in np.nonzero(res[u] > 1e-15)[0]:
        if parent[v] < 0:
          parent[v] = u
          q.append(v)
    if parent[sink] < 0:
      return flow
    v, bottleneck = sink, np.inf
    while v != source:
      bottleneck = min(bottleneck, res[parent[v], v])
      v = parent[v]
    v = sink
    while v != source:
      res[parent[v], v] -= bottleneck
      res[v, parent[v]] += bottleneck
      v = parent[v]
    flow += bottleneck


def attention_flow(maps_per_layer: Sequence, *, head_fusion: str = "mean",
                   residual: bool = True, rows: Optional[Sequence[int]] = None):
  """Max-flow from each top-layer token to each input token: [B, T, T]
  (NumPy float64; rows are the output tokens). `rows` (e.g. [0] for the
  cls token): only those output tokens, [B, len(rows), T], len(rows)/T of
  the cost."""
  layers = [np.asarray(fuse_heads(m, head_fusion, residual), np.float64)
            for m in _layers(maps_per_layer)]
  b, t, _ = layers[0].shape
  rows = list(range(t)) if rows is None else [int(r) for r in rows]
  if not rows or min(rows) < -t or max(rows) >= t:
    raise ValueError(f"`rows` must be non-empty indices into {t} tokens, got "
                     f"{rows}.")
  rows = [r % t for r in rows]
  n_layers = len(layers)
  n = (n_layers + 1) * t                 # node (l, i) = l * t + i; l = 0 input
  out = np.zeros((b, len(rows), t))
  for bi in range(b):
    cap = np.zeros((n, n))
    for l, a in enumerate(layers):       # token i at l+1 reads j at l: a[i, j]
      for i in range(t):
        for j in range(t):
          cap[(l + 1) * t + i, l * t + j] = a[bi, i, j]
    for ri, i in enumerate(rows):
      for j in range(t):
        out[bi, ri, j] = _max_flow(cap, n_layers * t + i, j)
  return out
