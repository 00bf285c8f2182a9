"""Masked-slot invariance of the sequence family (issue 15, item 1).

Whatever a key/value slot excluded by the key-padding mask holds (NaN, +Inf,
-Inf) never changes any output or gradient: outputs and the gradients at
unmasked positions equal those of the clean inputs, and the gradient at a
masked slot is exactly zero. The reference is the same call on clean inputs
(masked slots hold ordinary numbers), so a leak shows as a NaN/Inf or a
difference.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import sequence as sq

B, T, N, H = 2, 12, 2, 8
LENGTHS = (9, 5)


def _inputs(seed=0, t=T, s=T):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(B, t, N, H)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(B, s, N, H)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(B, s, N, H)), jnp.float32)
  keep = np.arange(s)[None, :] < np.asarray(LENGTHS)[:, None]      # [B, S]
  return q, k, v, jnp.asarray(keep)


def _poison(x, keep, value):
  return jnp.where(keep[:, :, None, None], x, jnp.asarray(value, x.dtype))


_PROJ = sq.orthogonal_random_features(jax.random.key(3), 16, H)
_LAYOUT = np.array([[1, 0, 0], [1, 1, 0], [1, 1, 1]], bool)

PRIMITIVES = {
    "linear": sq.linear_attention,
    "linear_chunked": functools.partial(sq.linear_attention, chunk_size=4),
    "efficient": sq.efficient_attention,
    "performer": lambda q, k, v, **kw: sq.performer_attention(q, k, v, _PROJ,
                                                              **kw),
    "sliding_window": functools.partial(sq.sliding_window_attention,
                                        window_size=3),
    "block_sparse": lambda q, k, v, **kw: sq.block_sparse_attention(
        q, k, v, _LAYOUT, 4, **kw),
    "moba": functools.partial(sq.moba_attention, block_size=4, top_k=2),
    "routing": functools.partial(sq.routing_attention, region_size=4, top_k=2),
    "agent": functools.partial(sq.agent_attention, num_agents=3),
    "mixture_of_heads": lambda q, k, v, **kw: sq.mixture_of_heads_attention(
        q, k, v, jnp.linspace(0.2, 1.0, B * T * N).reshape(B, T, N), **kw),
    "mixture_of_heads_sliding": lambda q, k, v, **kw:
        sq.mixture_of_heads_attention(
            q, k, v, jnp.ones((B, T, N)),
            attention_fn=functools.partial(sq.sliding_window_attention,
                                           window_size=2), **kw),
}
NONCAUSAL_ONLY = {"efficient", "agent"}


def _cases():
  for name in PRIMITIVES:
    for causal in (False, True):
      if causal and name in NONCAUSAL_ONLY:
        continue
      yield name, causal


POISONS = ((np.nan, "kv"), (np.inf, "k"), (-np.inf, "v"), (np.inf, "kv"))


def _check_invariant(fn, q, k, v, keep, poisons=POISONS):
  """One jitted forward+backward, run on the clean inputs and on each
  poisoning (value, which of k/v)."""
  mask = keep[:, None, None, :]
  f = lambda q, k, v: fn(q, k, v, mask=mask)

  @jax.jit
  def run(q, k, v, cot):
    out, vjp = jax.vjp(f, q, k, v)
    return (out,) + vjp(cot)

  cot = jnp.asarray(np.random.default_rng(9).normal(size=q.shape[:-1] +
                                                     v.shape[-1:]), q.dtype)
  base = [np.asarray(x) for x in run(q, k, v, cot)]
  assert all(np.all(np.isfinite(x)) for x in base)
  kp = np.asarray(keep)
  for value, which in poisons:
    kk = _poison(k, keep, value) if "k" in which else k
    vv = _poison(v, keep, value) if "v" in which else v
    out, dq, dk, dv = (np.asarray(x) for x in run(q, kk, vv, cot))
    msg = f"poison {value} in {which}"
    np.testing.assert_allclose(out, base[0], rtol=1e-5, atol=1e-6,
                               err_msg=msg)
    np.testing.assert_allclose(dq, base[1], rtol=1e-4, atol=1e-5, err_msg=msg)
    for g_bad, g_clean in ((dk, base[2]), (dv, base[3])):
      np.testing.assert_allclose(g_bad[kp], g_clean[kp], rtol=1e-4,
                                 atol=1e-5, err_msg=msg)
      assert np.all(g_bad[~kp] == 0.0), f"gradient at a masked slot: {msg}"


@pytest.mark.parametrize("name,causal", list(_cases()))
def test_masked_slot_never_reaches_output_or_gradient(name, causal):
  q, k, v, keep = _inputs()
  fn = functools.partial(PRIMITIVES[name], is_causal=causal)
  _check_invariant(fn, q, k, v, keep)


@pytest.mark.parametrize("name", ["sliding_window", "moba", "block_sparse"])
def test_masked_slot_invariance_cross_attention(name):
  t, s = 8, 12
  q, k, v, keep = _inputs(seed=1, t=t, s=s)
  fn = PRIMITIVES[name]
  if name == "block_sparse":
    lay = np.ones((2, 3), bool)
    lay[0, 2] = False
    fn = lambda q, k, v, **kw: sq.block_sparse_attention(q, k, v, lay, 4, **kw)
  _check_invariant(fn, q, k, v, keep, poisons=((np.nan, "kv"),))


@pytest.mark.parametrize("name", ["sliding_window", "moba", "efficient",
                                  "performer"])
def test_masked_slot_bf16(name):
  q, k, v, keep = _inputs(seed=2)
  q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
  mask = keep[:, None, None, :]
  fn = jax.jit(lambda q, k, v: PRIMITIVES[name](q, k, v, mask=mask))
  base = fn(q, k, v)
  bad = fn(q, _poison(k, keep, np.nan), _poison(v, keep, np.inf))
  np.testing.assert_array_equal(np.asarray(bad, np.float32),
                                np.asarray(base, np.float32))


# ------------------------------------------------------------------ layers

def _layers():
  rngs = lambda: nnx.Rngs(0)
  d = 16
  return {
      "LinearAttention": lambda: sq.LinearAttention(2, d, rngs=rngs()),
      "EfficientAttention": lambda: sq.EfficientAttention(2, d, rngs=rngs()),
      "PerformerAttention": lambda: sq.PerformerAttention(
          2, d, num_features=8, rngs=rngs()),
      "SlidingWindowAttention": lambda: sq.SlidingWindowAttention(
          2, d, window_size=2, rngs=rngs()),
      "MoBAAttention": lambda: sq.MoBAAttention(2, d, block_size=4, top_k=2,
                                                rngs=rngs()),
      "RoutingAttention": lambda: sq.RoutingAttention(2, d, region_size=4,
                                                      top_k=2, rngs=rngs()),
      "AgentAttention": lambda: sq.AgentAttention(2, d, num_agents=3,
                                                  rngs=rngs()),
      "MoHAttention": lambda: sq.MoHAttention(2, d, num_shared_heads=1,
                                              num_active_heads=2, rngs=rngs()),
  }


@pytest.mark.parametrize("name", list(_layers()))
def test_layer_masked_slot_invariance(name):
  layer = _layers()[name]()
  d = 16
  rng = np.random.default_rng(4)
  xq = jnp.asarray(rng.normal(size=(B, T, d)), jnp.float32)
  xkv = jnp.asarray(rng.normal(size=(B, T, d)), jnp.float32)
  keep = jnp.asarray(np.arange(T)[None, :] < np.asarray(LENGTHS)[:, None])
  bad = jnp.where(keep[:, :, None], xkv, jnp.nan)
  mask = keep[:, None, None, :]
  graphdef, state = nnx.split(layer)

  @jax.jit
  def run(state, xkv):
    def loss(state):
      y = nnx.merge(graphdef, state)(xq, xkv, xkv, mask=mask)
      return jnp.sum(y ** 2), y
    return jax.grad(loss, has_aux=True)(state)

  g0, y0 = run(state, xkv)
  g1, y1 = run(state, bad)
  np.testing.assert_allclose(np.asarray(y1), np.asarray(y0), rtol=1e-5,
                             atol=1e-6)
  for a, b_ in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    assert np.all(np.isfinite(np.asarray(b_)))
    np.testing.assert_allclose(np.asarray(b_), np.asarray(a), rtol=1e-4,
                               atol=1e-5)
