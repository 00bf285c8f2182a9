"""'chunked' splits each block loop into edge blocks (masked) and interior
blocks (no band / key-padding mask): issue 22 item 4 (causal <= 0.55x the
non-causal time). Checked here: values and gradients against the float64
NumPy reference for bands whose edges fall inside, on and between blocks
(causal, windows, offsets, per-example offsets, bottom-right alignment, key
padding), and that the interior loop of a causal call builds no mask.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax
from attnjax.softmax import Chunked
from tests.reference_np import attention_np

B, N, H = 2, 2, 8

CASES = [
    # (t, s, kwargs for both, block_q, block_kv)
    (40, 40, dict(is_causal=True), 8, 8),
    (40, 37, dict(is_causal=True), 16, 8),          # key padding
    (33, 40, dict(local_window_size=(9, 3)), 8, 16),
    (40, 40, dict(local_window_size=(0, 17)), 16, 8),
    (24, 40, dict(is_causal=True, q_offset=13), 8, 8),
    (24, 40, dict(is_causal=True, causal_alignment="bottom_right"), 8, 16),
    (24, 40, dict(is_causal=True, local_window_size=(11, 0),
                  q_offset=np.array([3, 16])), 8, 8),  # per-example offsets
]


def _ref_kwargs(kw, t, s):
  ref = {}
  if kw.get("is_causal"):
    ref["is_causal"] = True
  if "local_window_size" in kw:
    ref["window"] = kw["local_window_size"]
  if "q_offset" in kw:
    ref["q_offset"] = kw["q_offset"]
  if kw.get("causal_alignment") == "bottom_right":
    ref["bottom_right"] = True
  return ref


@pytest.mark.parametrize("t,s,kw,bq,bk", CASES)
def test_split_loops_match_float64_reference(t, s, kw, bq, bk):
  rng = np.random.default_rng(t * 100 + s)
  q = rng.standard_normal((B, t, N, H)).astype(np.float32)
  k = rng.standard_normal((B, s, N, H)).astype(np.float32)
  v = rng.standard_normal((B, s, N, H)).astype(np.float32)
  dout = rng.standard_normal((B, t, N, H)).astype(np.float32)
  call_kw = {key: (jnp.asarray(val) if isinstance(val, np.ndarray) else val)
             for key, val in kw.items()}
  impl = Chunked(block_q=bq, block_kv=bk)

  def loss(q, k, v):
    out = attnjax.dot_product_attention(q, k, v, implementation=impl,
                                        **call_kw)
    return jnp.sum(out * dout), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2),
                                               has_aux=True))(q, k, v)
  ref = attention_np(q, k, v, dout=dout, **_ref_kwargs(kw, t, s))
  np.testing.assert_allclose(out, ref["out"], rtol=2e-5, atol=2e-5)
  for name, g in zip(("dq", "dk", "dv"), grads):
    np.testing.assert_allclose(g, ref[name], rtol=1e-4, atol=1e-4,
                               err_msg=name)


def _loop_bodies(jaxpr):
  """Bodies of every while loop in a jaxpr (nested ones included)."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "while":
      found.append(eqn.params["body_jaxpr"].jaxpr)
    for val in eqn.params.values():
      for sub in (val if isinstance(val, (tuple, list)) else (val,)):
        sub = getattr(sub, "jaxpr", sub)   # ClosedJaxpr -> Jaxpr
        if hasattr(sub, "eqns"):
          found.extend(_loop_bodies(sub))
  return found


def _selects_on_blocks(jaxpr, bq, bk):
  """select_n ops on [.., bq, bk] blocks in a loop body (through nested
  calls such as jnp.where's pjit, not into nested loops)."""
  count = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "select_n":
      count += eqn.outvars[0].aval.shape[-2:] == (bq, bk)
    elif eqn.primitive.name != "while":
      for val in eqn.params.values():
        sub = getattr(val, "jaxpr", val)
        if hasattr(sub, "eqns"):
          count += _selects_on_blocks(sub, bq, bk)
  return count


@pytest.mark.parametrize("grad", [False, True])
def test_causal_interior_blocks_build_no_mask(grad):
  """Causal: of the loops over blocks, some take no select on a block (the
  interior ones) and the others mask; before the split every block loop
  masked."""
  x = jnp.zeros((1, 64, 2, 8))
  impl = Chunked(block_q=16, block_kv=16)
  f = lambda q, k, v: attnjax.dot_product_attention(
      q, k, v, is_causal=True, implementation=impl).sum()
  if grad:
    f = jax.grad(f, argnums=(0, 1, 2))
  bodies = [b for b in _loop_bodies(jax.make_jaxpr(f)(x, x, x).jaxpr)
            if any(e.primitive.name == "dot_general" for e in b.eqns)]
  counts = [_selects_on_blocks(b, 16, 16) for b in bodies]
  assert 0 in counts and any(c > 0 for c in counts), counts
