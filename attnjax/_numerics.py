"""Numerical rules shared by every attention family (bottom of the import graph).

`NEG`/`POS` are the finite sentinels that stand for -inf/+inf in masked
logits and routing scores (finite, so `jax.debug_infs` holds), and
`masked_softmax` is the one masked softmax of the XLA family paths.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

NEG = float(np.finfo(np.float32).min)
POS = float(np.finfo(np.float32).max)


def masked_softmax(logits, ok=None, axis=-1):
  """float32 softmax over `axis`; entries with `ok` False get exactly 0 and a
  row with nothing allowed is all zeros. No inf is formed, and whatever a
  masked entry's logit holds (NaN, Inf) never reaches the result."""
  logits = logits.astype(jnp.float32)
  if ok is not None:
    logits = jnp.where(ok, logits, NEG)
  m = jnp.max(logits, axis=axis, keepdims=True, initial=NEG)  # empty axis ok
  m = jax.lax.stop_gradient(jnp.where(m > 0.5 * NEG, m, 0.0))
  p = jnp.exp(logits - m)
  if ok is not None:
    p = jnp.where(ok, p, 0.0)
  l = jnp.sum(p, axis=axis, keepdims=True)
  return p / jnp.where(l > 0, l, 1.0)


def gate_heads(gate, num_heads: int, out, heads: slice = slice(None)):
  """out [..., n, d] (the heads `heads` of a layer with `num_heads` heads, in
  order) times their per-head gates `gate` ([num_heads] array or anything
  with `[...]`, e.g. an nnx.Variable); unchanged when `gate` is None. The
  gate broadcasts with explicit rank (strict rank promotion holds). Used by
  `attnjax.MultiHeadAttention.head_gate` and the spatial layers' `HeadGated`
  (Michel, Levy & Neubig 2019; `attnjax.analysis.head_gates`)."""
  if gate is None:
    return out
  from flax import nnx   # flax only where a gate is set
  gate = jnp.asarray(gate[...] if isinstance(gate, nnx.Variable) else gate)
  if gate.shape != (num_heads,):
    raise ValueError(f"`head_gate` must have shape [num_heads]="
                     f"({num_heads},), got {tuple(gate.shape)}.")
  gate = gate[heads]
  if out.shape[-2] != gate.shape[0]:
    raise ValueError(f"head_gate selects {gate.shape[0]} heads for an "
                     f"output with shape {tuple(out.shape)} ([..., heads, "
                     f"d] expected).")
  gate = gate.astype(out.dtype).reshape((1,) * (out.ndim - 2) + (-1, 1))
  return out * gate
