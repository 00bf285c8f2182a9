"""Budgeted attention-guided token selection (HiRED-style: Arif et al. 2025,
"HiRED: Attention-Guided Token Dropping for Efficient Inference of
High-Resolution Vision-Language Models").

Given a total token budget K and the image split into partitions (HiRED:
the sub-images of a high-resolution input), each partition gets a share of
K proportional to its importance (HiRED: the CLS attention an early layer
pays to its tokens), and within each partition the tokens with the highest
score (HiRED: CLS attention of the final layer) are kept.

* `allocate_budget(importance [P], sizes [P], budget)`: integer shares that
  sum to `min(budget, sum(sizes))`, proportional to importance by the
  largest-remainder rule, each capped at its partition's size (capped
  surplus goes to the others by the same rule).
* `select_tokens(scores [B, S], budget, partitions=None, importance=None)`:
  kept indices [B, K] in increasing order. `partitions` [S] labels 0..P-1
  (default: one partition = global top-K); `importance` [B, P] (default:
  the summed scores of each partition).
* `cls_attention(maps)`: the CLS row of a recorded map, head-averaged, with
  the CLS key dropped: [B, S - 1] (scores of the patch tokens).
* `drop_tokens(tokens [B, S, C], idx [B, K])`: the kept tokens.
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
import numpy as np

from attnjax.analysis.head_stats import check_maps

__all__ = ["allocate_budget", "select_tokens", "cls_attention", "drop_tokens"]


def allocate_budget(importance, sizes, budget: int):
  """Largest-remainder allocation of `budget` tokens over partitions."""
  imp = np.asarray(importance, np.float64)
  sizes = np.asarray(sizes, np.int64)
  if imp.ndim != 1 or imp.shape != sizes.shape:
    raise ValueError(f"`importance` and `sizes` must be 1-D of equal length, "
                     f"got {imp.shape} and {sizes.shape}.")
  if np.any(imp < 0) or not np.all(np.isfinite(imp)):
    raise ValueError(f"`importance` must be finite and >= 0, got {imp}.")
  if budget < 0:
    raise ValueError(f"`budget` must be >= 0, got {budget}.")
  total = int(min(budget, sizes.sum()))
  alloc = np.zeros_like(sizes)
  open_ = sizes > 0
  while alloc.sum() < total:
    left = total - alloc.sum()
    w = np.where(open_, imp, 0.0)
    if w.sum() <= 0:                       # no importance left: by free room
      w = np.where(open_, (sizes - alloc).astype(np.float64), 0.0)
    share = w / w.sum() * left
    base = np.floor(share).astype(np.int64)
    rem = left - base.sum()
    order = np.argsort(-(share - base), kind="stable")
    base[order[:rem]] += 1
    alloc = np.minimum(alloc + base, sizes)
    open_ = alloc < sizes
  return alloc


def select_tokens(scores, budget: int, partitions=None,
                  importance: Optional[np.ndarray] = None):
  """Kept token indices [B, K] (sorted) under the budget."""
  sc = np.asarray(scores, np.float64)
  if sc.ndim != 2:
    raise ValueError(f"`scores` must be [batch, tokens], got {sc.shape}.")
  b, s = sc.shape
  labels = (np.zeros(s, np.int64) if partitions is None
            else np.asarray(partitions, np.int64))
  if labels.shape != (s,) or labels.min() < 0:
    raise ValueError(f"`partitions` must be [tokens]={s} labels >= 0, got "
                     f"{labels.shape}.")
  p = int(labels.max()) + 1
  sizes = np.bincount(labels, minlength=p)
  if importance is None:
    imp = np.stack([np.bincount(labels, sc[i], minlength=p) for i in range(b)])
  else:
    imp = np.asarray(importance, np.float64)
    if imp.shape != (b, p):
      raise ValueError(f"`importance` must be [batch, partitions]={(b, p)}, "
                       f"got {imp.shape}.")
  k = int(min(budget, s))
  out = np.zeros((b, k), np.int64)
  for i in range(b):
    alloc = allocate_budget(imp[i], sizes, k)
    kept = []
    for part in range(p):
      idx = np.nonzero(labels == part)[0]
      top = idx[np.argsort(-sc[i, idx], kind="stable")[:alloc[part]]]
      kept.extend(top.tolist())
    out[i] = np.sort(kept)
  return out


def cls_attention(maps, cls_index: int = 0):
  """Head-averaged attention of the CLS query to the other tokens:
  [B, S - 1] (key order kept, CLS key removed)."""
  m = check_maps(maps)
  row = m[:, :, cls_index].mean(1)
  return jnp.delete(row, cls_index, axis=-1, assume_unique_indices=True)


def drop_tokens(tokens, idx):
  """tokens [B, S, C], idx [B, K] -> [B, K, C]."""
  return jnp.take_along_axis(tokens, jnp.asarray(idx)[..., None], axis=1)
