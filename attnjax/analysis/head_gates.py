"""Head importance and head pruning through per-head gates (Michel, Levy &
Neubig 2019, "Are Sixteen Heads Really Better than One?").

Every `attnjax.MultiHeadAttention` (and subclass) and every spatial layer
with heads (`attnjax.spatial._common.HeadGated`: neighborhood, window /
shifted window, grid, axial (one gate per axis attention), CSWin, Twins GSA
/ LSA, HiLo, BiFormer, DaViT channel, GPSA, CrossViT, CoaT, CrossFormer,
DCAL, HaloNet, HAT, PTv3, sphere, TransNeXt, 3D windows, S2AFormer SSA, BOAT
FSLA, Atlas MSA per scale) multiplies head h's output by `head_gate[h]`
before the output projection when its `head_gate` is set (default None: no
gate, no cost). The functions here set gates on a *view* of the model
(`nnx.with_attributes`: new module objects sharing the model's
arrays); the model itself is never modified.

* `head_importance(model, loss_fn, batches)`: I_h = mean over batches of
  |dL(batch)/d xi_h| at xi = 1 (the paper's importance score, gradients
  accumulated per batch as in its implementation), optionally divided by
  each layer's L2 norm (the paper's layer-wise normalization). Returns
  {layer path: [heads]} in network order.
* `gated_view(model, gates=None)`: the view with gates (default ones) as
  `HeadGate` variables, and the layer paths.
* `prune_heads(model, mask)`: a view whose masked heads (mask 0) output
  nothing.
* `pruning_curve(model, importance, eval_fn, counts)`: eval_fn(view) after
  pruning the k globally least important heads, for each k in counts (the
  paper's accuracy-vs-heads-pruned curve).
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnjax.nn import MultiHeadAttention
from attnjax.spatial._common import HeadGated

__all__ = ["HeadGate", "gated_layers", "gated_view", "head_importance",
           "prune_heads", "pruning_curve"]


class HeadGate(nnx.Variable):
  """Per-head output gates [num_heads] of one attention layer."""


def _key(path):
  return [(0, int(t), "") if t.isdigit() else (1, 0, t)
          for t in str(path).split("/")]


GATED_TYPES = (MultiHeadAttention, HeadGated)


def gated_layers(model):
  """[(path, layer)] of the model's gated attention layers
  (MultiHeadAttention and the spatial `HeadGated` layers) in network order
  (paths compared by their integer parts)."""
  out = []
  for path, node in nnx.iter_graph(model):
    if isinstance(node, GATED_TYPES):
      out.append(("/".join(str(p) for p in path), node))
  if not out:
    raise ValueError(f"{type(model).__name__} has no attention layer with "
                     "head gates (MultiHeadAttention or a spatial HeadGated "
                     "layer).")
  return sorted(out, key=lambda kv: _key(kv[0]))


def _gate_values(layers, gates, name):
  if gates is None:
    return [jnp.ones((l.num_heads,), jnp.float32) for _, l in layers]
  if isinstance(gates, dict):
    missing = [p for p, _ in layers if p not in gates]
    if missing:
      raise ValueError(f"`{name}` has no entry for layers {missing}.")
    vals = [gates[p] for p, _ in layers]
  else:
    vals = list(gates)
  if len(vals) != len(layers):
    raise ValueError(f"`{name}` must give one [heads] array per attention "
                     f"layer ({len(layers)}), got {len(vals)}.")
  out = []
  for (p, l), v in zip(layers, vals):
    v = jnp.asarray(v, jnp.float32)
    if v.shape != (l.num_heads,):
      raise ValueError(f"`{name}` for layer {p!r} must have shape "
                       f"({l.num_heads},), got {tuple(v.shape)}.")
    out.append(v)
  return out


def gated_view(model, gates=None):
  """(view, paths): a view of `model` whose attention layers carry
  `HeadGate` variables (default all ones; `gates` a {path: [heads]} dict or
  a sequence in network order)."""
  # nnx.data: spatial layers carry the gate only as a class default (None),
  # so the view's instance attribute must be declared data for the
  # HeadGate variable that replaces it.
  view = nnx.with_attributes(model, only=GATED_TYPES,
                             head_gate=nnx.data(None),
                             raise_if_not_found=False)
  layers = gated_layers(view)
  for (_, layer), g in zip(layers, _gate_values(layers, gates, "gates")):
    layer.head_gate = HeadGate(g)
  return view, [p for p, _ in layers]


def head_importance(model, loss_fn: Callable, batches: Iterable, *,
                    normalize: bool = True, jit: bool = True
                    ) -> Dict[str, np.ndarray]:
  """Michel et al. (2019) importance of every head: {path: [heads]}.

  Args:
    model: any NNX model with gated attention layers (put it in eval mode
      first if it has dropout).
    loss_fn: `loss_fn(model, batch) -> scalar` (e.g. mean cross-entropy).
    batches: iterable of batches (any pytree `loss_fn` takes).
    normalize: divide each layer's scores by their L2 norm (the paper).
    jit: jit the gradient function.
  """
  view, paths = gated_view(model)
  graphdef, gates, rest = nnx.split(view, HeadGate, ...)

  def loss(g, r, batch):
    return loss_fn(nnx.merge(graphdef, g, r), batch)

  grad_fn = jax.grad(loss)
  if jit:
    grad_fn = jax.jit(grad_fn)
  total, n = None, 0
  for batch in batches:
    g = jax.tree.map(jnp.abs, grad_fn(gates, rest, batch))
    total = g if total is None else jax.tree.map(jnp.add, total, g)
    n += 1
  if n == 0:
    raise ValueError("`batches` is empty.")
  flat = {}
  for path, v in nnx.to_flat_state(total):
    v = v.get_value() if isinstance(v, nnx.Variable) else v
    flat["/".join(str(p) for p in path[:-1])] = np.asarray(v) / n
  out = {}
  for p in paths:
    s = flat[p].astype(np.float64)
    if normalize:
      s = s / max(float(np.linalg.norm(s)), 1e-20)
    out[p] = s
  return out


def prune_heads(model, mask):
  """A view of `model` whose heads with mask 0 are removed (gate 0);
  `mask` a {path: [heads]} dict or a sequence in network order."""
  layers = gated_layers(model)
  vals = _gate_values(layers, mask, "mask")
  return gated_view(model, [jnp.where(v != 0, 1.0, 0.0) for v in vals])[0]


def pruning_curve(model, importance: Dict[str, np.ndarray],
                  eval_fn: Callable, counts: Optional[Sequence[int]] = None):
  """[(k, eval_fn(view with the k least important heads pruned))].

  Heads are ranked globally over layers by `importance` ({path: [heads]},
  e.g. from `head_importance`), ties by network order; `counts` defaults to
  0 .. total heads.
  """
  layers = gated_layers(model)
  scores = _gate_values(layers, importance, "importance")
  sizes = [int(s.shape[0]) for s in scores]
  flat = np.concatenate([np.asarray(s, np.float64) for s in scores])
  order = np.argsort(flat, kind="stable")
  total = flat.size
  counts = range(total + 1) if counts is None else counts
  out = []
  for k in counts:
    k = int(k)
    if not 0 <= k <= total:
      raise ValueError(f"`counts` entries must be in [0, {total}], got {k}.")
    keep = np.ones(total)
    keep[order[:k]] = 0.0
    masks = np.split(keep, np.cumsum(sizes)[:-1])
    out.append((k, eval_fn(prune_heads(model, masks))))
  return out
