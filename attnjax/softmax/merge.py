"""Merging partial softmax attentions through their log-sum-exps.

If keys/values are split into parts P_1..P_m (split-KV decoding, ring
attention, a KV cache plus new tokens) and part p gives (out_p, lse_p) for
the same queries, the attention over all keys is

    lse = log sum_p exp(lse_p),   out = sum_p exp(lse_p - lse) * out_p.

`merge_attentions` computes this with the max shifted out (stable for any
magnitudes), in float32, with rows whose parts all have lse = -inf (nothing
to attend to anywhere) giving out = 0 and lse = -inf, and with gradients that
stay finite there; a part whose lse is -inf contributes nothing, whatever its
out holds. Differentiating through it needs differentiable lses
(`dot_product_attention_with_lse(..., lse_gradient=True)`, the default).

Sinks: the lse of a call with `sinks` includes the sink; when splitting keys,
pass `sinks` to exactly one part so the sink is counted once.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def merge_attentions(outs: Sequence[jax.Array], lses: Sequence[jax.Array], *,
                     lse_layout: str = "BNT"):
  """Merges attentions over disjoint key sets into the attention over all.

  Args:
    outs: sequence of [..., T, N, Hv] outputs, one per key part.
    lses: matching log-sum-exps, [..., N, T] (lse_layout='BNT', as
      `dot_product_attention_with_lse` returns by default) or [..., T, N]
      ('BTN').
    lse_layout: 'BNT' or 'BTN', the layout of `lses` and of the merged lse.

  Returns:
    (out [..., T, N, Hv] in the dtype of outs[0], lse float32 in the given
    layout).
  """
  if lse_layout not in ("BNT", "BTN"):
    raise ValueError(
        f"`lse_layout` must be 'BNT' or 'BTN', got {lse_layout!r}.")
  outs, lses = list(outs), list(lses)
  if not outs or len(outs) != len(lses):
    raise ValueError(
        "`outs` and `lses` must be non-empty sequences of equal length, got "
        f"{len(outs)} and {len(lses)}.")
  outs = [jnp.asarray(o) for o in outs]
  lses = [jnp.asarray(l) for l in lses]
  shape = outs[0].shape
  if len(shape) < 3:
    raise ValueError(
        f"`outs` must have shape [..., T, N, Hv], got {shape}.")
  t, n = shape[-3], shape[-2]
  lse_shape = shape[:-3] + ((n, t) if lse_layout == "BNT" else (t, n))
  for i, (o, l) in enumerate(zip(outs, lses)):
    if o.shape != shape:
      raise ValueError(
          f"`outs` must share one shape, got outs[0] {shape} and outs[{i}] "
          f"{o.shape}.")
    if l.shape != lse_shape:
      raise ValueError(
          f"`lses[{i}]` must have shape {lse_shape} (lse_layout="
          f"{lse_layout!r}, outs {shape}), got {l.shape}.")
  # Work in [..., T, N] for the weights.
  as_btn = (lambda l: jnp.swapaxes(l, -1, -2)) if lse_layout == "BNT" else (
      lambda l: l)
  lse_all = jnp.stack([as_btn(l.astype(jnp.float32)) for l in lses])
  m = jnp.max(lse_all, axis=0, keepdims=True)               # [1, ..., T, N]
  m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
  w = jnp.exp(lse_all - m)                                   # [P, ..., T, N]
  m = m[0]
  total = jnp.sum(w, axis=0)
  has = total > 0.0
  safe = jnp.where(has, total, 1.0)
  acc = 0.0
  for p, o in enumerate(outs):
    wp = w[p][..., None]
    # A part with nothing to attend to (w = 0) adds exactly 0, even if its
    # out holds NaN.
    acc = acc + jnp.where(wp > 0.0, wp * o.astype(jnp.float32), 0.0)
  out = (acc / safe[..., None]).astype(outs[0].dtype)
  lse = jnp.where(has, m + jnp.log(safe), -jnp.inf)
  if lse_layout == "BNT":
    lse = jnp.swapaxes(lse, -1, -2)
  return out, lse


__all__ = ["merge_attentions"]
