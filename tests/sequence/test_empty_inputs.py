"""Empty inputs for the sequence-family primitives (issue 15).

Batch 0, q_len 0, kv_len 0 and both: every primitive returns the result of
`attnjax.dot_product_attention` on the same inputs (the reference: an empty
batch or query length gives an empty result, an empty key set zero rows),
in query.dtype, with gradients of the inputs' shapes (all zero). The one
refusal: agent attention pooling its agents from an empty query
(ValueError naming `num_agents`); with explicit agents it returns zeros.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax
from attnjax import sequence as sq

N, H, HV = 2, 4, 3
_PROJ = sq.orthogonal_random_features(jax.random.key(1), 8, H)


def _layout(q, k):
  return np.ones((-(-q.shape[1] // 4), -(-k.shape[1] // 4)), bool)


PRIMITIVES = {
    "linear": lambda q, k, v: sq.linear_attention(q, k, v),
    "linear_causal": lambda q, k, v: sq.linear_attention(
        q, k, v, is_causal=True, chunk_size=4),
    "efficient": lambda q, k, v: sq.efficient_attention(q, k, v),
    "performer": lambda q, k, v: sq.performer_attention(q, k, v, _PROJ),
    "performer_causal": lambda q, k, v: sq.performer_attention(
        q, k, v, _PROJ, is_causal=True, chunk_size=4),
    "sliding_window": lambda q, k, v: sq.sliding_window_attention(q, k, v, 2),
    "block_sparse": lambda q, k, v: sq.block_sparse_attention(
        q, k, v, _layout(q, k), 4),
    "moba": lambda q, k, v: sq.moba_attention(q, k, v, block_size=4, top_k=1),
    "routing": lambda q, k, v: sq.routing_attention(q, k, v, region_size=4,
                                                    top_k=1),
    "agent": lambda q, k, v: sq.agent_attention(
        q, k, v, agents=jnp.ones((1, 2, N, H))),
    "mixture_of_heads": lambda q, k, v: sq.mixture_of_heads_attention(
        q, k, v, jnp.full(q.shape[:2] + (N,), 0.5),
        attention_fn=functools.partial(sq.sliding_window_attention,
                                       window_size=2)),
    "triplewise": lambda q, k, v: sq.triplewise_attention(
        q, k, v, k, v, query_chunk=4, key_chunk=4),
}

# (batch, q_len, kv_len)
SHAPES = {"batch0": (0, 8, 8), "q_len0": (1, 0, 8), "kv_len0": (1, 8, 0),
          "both0": (1, 0, 0)}


def _inputs(b, t, s):
  kq, kk, kv = jax.random.split(jax.random.key(0), 3)
  return (jax.random.normal(kq, (b, t, N, H)),
          jax.random.normal(kk, (b, s, N, H)),
          jax.random.normal(kv, (b, s, N, HV)))


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("name", sorted(PRIMITIVES))
def test_empty_inputs_match_dot_product_attention(name, shape):
  q, k, v = _inputs(*SHAPES[shape])
  f = PRIMITIVES[name]
  out = f(q, k, v)
  ref = attnjax.dot_product_attention(q, k, v)
  assert out.shape == ref.shape == q.shape[:3] + (HV,)
  assert out.dtype == q.dtype
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
  grads = jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) ** 2),
                   argnums=(0, 1, 2))(q, k, v)
  for g, x in zip(grads, (q, k, v)):
    assert g.shape == x.shape
    np.testing.assert_array_equal(np.asarray(g), np.zeros(x.shape))


@pytest.mark.parametrize("name", ["linear_causal", "sliding_window", "moba",
                                  "triplewise"])
def test_empty_kv_len_under_jit_unbatched(name):
  q, k, v = (x[0] for x in _inputs(1, 8, 0))
  out = jax.jit(PRIMITIVES[name])(q, k, v)
  np.testing.assert_array_equal(np.asarray(out), np.zeros((8, N, HV)))


def test_agent_pooling_from_empty_query_names_num_agents():
  q, k, v = _inputs(1, 0, 8)
  with pytest.raises(ValueError, match="num_agents"):
    sq.agent_attention(q, k, v, num_agents=2)
