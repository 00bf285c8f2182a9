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
