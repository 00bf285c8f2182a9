"""MoH: Mixture-of-Head attention (Jin et al. 2024).

Heads are experts. The first `num_shared_heads` heads are always active; of
the remaining (routed) heads each token activates its top-k, with
k = num_active_heads - num_shared_heads. Head outputs are summed with
per-token weights instead of concatenated:

  g_i = a_1 softmax(W_s x)_i                    shared heads
  g_i = a_2 softmax(W_r x)_i  if i in top-k     routed heads (else 0)
  [a_1, a_2] = softmax(W_h x)
  out = sum_i g_i H^i W_O^i

and the load-balancing loss over routed heads is

  L_b = sum_i f_i P_i,  f_i = fraction of tokens selecting head i,
                        P_i = mean over tokens of softmax(W_r x)_i

(equal to k / n_routed when balanced). Here every head is computed and the
gates zero the inactive ones, so the saving is in the function, not in FLOPs.
Works with any attention primitive: supports what `attention_fn` supports.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.softmax import dot_product_attention

SUPPORT = {
    "noncausal_self": True, "causal_self": True,
    "noncausal_cross": True, "causal_cross": True,
}


def _check_counts(num_heads, num_shared_heads, num_active_heads):
  if not (0 <= num_shared_heads <= num_heads):
    raise ValueError(
        f"`num_shared_heads` must be in [0, num_heads={num_heads}], got "
        f"{num_shared_heads}.")
  if not (num_shared_heads <= num_active_heads <= num_heads):
    raise ValueError(
        f"`num_active_heads` must be in [num_shared_heads={num_shared_heads}, "
        f"num_heads={num_heads}], got {num_active_heads}.")
  if num_shared_heads == 0 and num_active_heads == 0:
    raise ValueError("`num_active_heads` must be positive.")


def moh_gates(router_logits, *, num_shared_heads: int, num_active_heads: int,
              loss_mask=None):
  """Per-token head weights and the load-balancing loss.

  Args:
    router_logits: [..., num_heads + 2]: logits of the shared heads (W_s x),
      of the routed heads (W_r x), then the two mixing logits (W_h x).
    num_shared_heads: always-active heads (the first ones).
    num_active_heads: active heads per token, shared included.
    loss_mask: optional bool [...] of tokens counted in the loss (padding
      excluded).

  Returns:
    (gates [..., num_heads] float32, load_balance_loss scalar float32).
  """
  router_logits = jnp.asarray(router_logits)
  if (router_logits.ndim < 1 or router_logits.shape[-1] < 3 or
      not jnp.issubdtype(router_logits.dtype, jnp.floating)):
    raise ValueError(
        "`router_logits` must be a float array [..., num_heads + 2] with "
        f"num_heads >= 1, got shape {tuple(router_logits.shape)} and dtype "
        f"{router_logits.dtype}.")
  for nm, c in (("num_shared_heads", num_shared_heads),
                ("num_active_heads", num_active_heads)):
    if isinstance(c, (bool, np.bool_)) or not isinstance(c, (int, np.integer)):
      raise ValueError(f"`{nm}` must be an int, got {c!r}.")
  num_shared_heads, num_active_heads = int(num_shared_heads), int(
      num_active_heads)
  logits = router_logits.astype(jnp.float32)
  num_heads = logits.shape[-1] - 2
  _check_counts(num_heads, num_shared_heads, num_active_heads)
  hs, hr = num_shared_heads, num_heads - num_shared_heads
  kk = num_active_heads - hs
  shared, routed, mix = (logits[..., :hs], logits[..., hs:num_heads],
                         logits[..., num_heads:])
  alpha = jax.nn.softmax(mix, axis=-1)
  if hs == 0:
    alpha = jnp.stack([jnp.zeros_like(alpha[..., 0]),
                       jnp.ones_like(alpha[..., 1])], -1)
  if hr == 0 or kk == 0:
    alpha = jnp.stack([jnp.ones_like(alpha[..., 0]),
                       jnp.zeros_like(alpha[..., 1])], -1)
  g_shared = alpha[..., :1] * jax.nn.softmax(shared, axis=-1)
  if hr == 0:
    return g_shared, jnp.zeros((), jnp.float32)
  p = jax.nn.softmax(routed, axis=-1)
  if kk > 0:
    _, top = jax.lax.top_k(routed, kk)
    chosen = jnp.sum(jax.nn.one_hot(top, hr, dtype=jnp.float32), axis=-2)
  else:
    chosen = jnp.zeros_like(p)
  g_routed = alpha[..., 1:] * p * chosen
  w = (jnp.ones(chosen.shape[:-1], jnp.float32) if loss_mask is None else
       jnp.broadcast_to(loss_mask, chosen.shape[:-1]).astype(jnp.float32))
  denom = jnp.maximum(jnp.sum(w), 1.0)
  f = jnp.einsum("...i,...->i", jax.lax.stop_gradient(chosen), w) / denom
  pm = jnp.einsum("...i,...->i", p, w) / denom
  loss = jnp.sum(f * pm)
  return jnp.concatenate([g_shared, g_routed], axis=-1), loss


def mixture_of_heads_attention(query, key, value, gates, *,
                               attention_fn: Callable = dot_product_attention,
                               **kwargs):
  """Per-head attention outputs [B, T, N, Hv] scaled by gates [B, T, N].

  Feed the result to the output projection: `out(o * g)` is the weighted sum
  `sum_i g_i H^i W_O^i`. `kwargs` go to `attention_fn`.
  """
  o = attention_fn(query, key, value, **kwargs)
  if gates.shape != o.shape[:-1]:
    raise ValueError(
        f"`gates` must have shape {o.shape[:-1]} ([B, T, N]), got "
        f"{gates.shape}.")
  return (o.astype(jnp.float32) * gates[..., None]).astype(o.dtype)


def moh_gates_reference(router_logits, *, num_shared_heads: int,
                        num_active_heads: int):
  """Token-by-token NumPy-style definition of `moh_gates` (no loss_mask)."""
  import numpy as np
  logits = np.asarray(router_logits, np.float64)
  lead = logits.shape[:-1]
  logits = logits.reshape(-1, logits.shape[-1])
  num_heads = logits.shape[-1] - 2
  hs, kk = num_shared_heads, num_active_heads - num_shared_heads
  hr = num_heads - hs
  sm = lambda z: np.exp(z - z.max()) / np.exp(z - z.max()).sum()
  gates = np.zeros((logits.shape[0], num_heads))
  sel = np.zeros((logits.shape[0], hr))
  probs = np.zeros((logits.shape[0], hr))
  for t, row in enumerate(logits):
    a1, a2 = sm(row[num_heads:])
    if hs == 0:
      a1, a2 = 0.0, 1.0
    if hr == 0 or kk == 0:
      a1, a2 = 1.0, 0.0
    if hs:
      gates[t, :hs] = a1 * sm(row[:hs])
    if hr:
      p = sm(row[hs:num_heads])
      probs[t] = p
      for i in np.argsort(-row[hs:num_heads], kind="stable")[:kk]:
        sel[t, i] = 1.0
        gates[t, hs + i] = a2 * p[i]
  loss = float(np.sum(sel.mean(0) * probs.mean(0))) if hr else 0.0
  return gates.reshape(lead + (num_heads,)), loss
