"""Strict JAX modes over the sequence and spatial families (issue 15).

A representative call (forward and gradient, eager so that every op is
checked) of every public primitive and layer of attnjax.sequence and
attnjax.spatial under jax_numpy_rank_promotion='raise',
jax_numpy_dtype_promotion='strict' and jax.debug_infs(True); masked calls
included (a key-padding mask), since masks are where -inf and bool*float
used to appear.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import sequence as sq
from attnjax import spatial as sp
from tests.strict_modes import STRICT_MODES, modes_for_this_run
from tests.strict_modes import strict_mode

# Cases known to fail under a strict mode (non-strict xfail: a case that
# passes is reported as XPASS, so the list can be pruned). Empty: MoBA's
# gate (own-block mask), average_pool's window counts (pooled attention,
# HiLo) and GPSA's gate were given explicit ranks (issue 15).
KNOWN_STRICT_FAILURES = frozenset()


def _params(names):
  # Each strict mode separately; under CI the three at once ('all': a mode
  # only adds errors, so it fails exactly where one of them would).
  return [pytest.param(n, m, marks=pytest.mark.xfail(
      reason=f"{n} under {m}: known strict-mode failure (issue 15)",
      strict=False) if (n, m) in KNOWN_STRICT_FAILURES else ())
          for n in names for m in modes_for_this_run()]

B, T, N, H = 1, 8, 2, 4


def _seq_inputs():
  ks = jax.random.split(jax.random.key(0), 3)
  q, k, v = (jax.random.normal(x, (B, T, N, H), jnp.float32) for x in ks)
  mask = (jnp.arange(T) < 6)[None, None, None, :]
  return q, k, v, mask


_PROJ = sq.orthogonal_random_features(jax.random.key(1), 8, H)
_LAYOUT = np.array([[1, 0], [1, 1]], bool)

SEQ_PRIMITIVES = {
    "linear_attention": lambda q, k, v, m: sq.linear_attention(
        q, k, v, mask=m, is_causal=True, chunk_size=4),
    "linear_attention_reference": lambda q, k, v, m:
        sq.linear_attention_reference(q, k, v, mask=m),
    "efficient_attention": lambda q, k, v, m: sq.efficient_attention(
        q, k, v, mask=m),
    "performer_attention": lambda q, k, v, m: sq.performer_attention(
        q, k, v, _PROJ, mask=m, is_causal=True, chunk_size=4),
    "performer_attention_noncausal": lambda q, k, v, m:
        sq.performer_attention(q, k, v, _PROJ, mask=m),
    "sliding_window_attention": lambda q, k, v, m:
        sq.sliding_window_attention(q, k, v, 2, mask=m, is_causal=True),
    "block_sparse_attention": lambda q, k, v, m: sq.block_sparse_attention(
        q, k, v, _LAYOUT, 4, mask=m),
    "moba_attention": lambda q, k, v, m: sq.moba_attention(
        q, k, v, block_size=4, top_k=1, mask=m, is_causal=True),
    "routing_attention": lambda q, k, v, m: sq.routing_attention(
        q, k, v, region_size=4, top_k=1, mask=m),
    "agent_attention": lambda q, k, v, m: sq.agent_attention(
        q, k, v, num_agents=2, mask=m),
    "mixture_of_heads_attention": lambda q, k, v, m:
        sq.mixture_of_heads_attention(
            q, k, v, jnp.full((B, T, N), 0.5),
            attention_fn=functools.partial(sq.sliding_window_attention,
                                           window_size=2), mask=m),
    "triplewise_attention": lambda q, k, v, m: sq.triplewise_attention(
        q, k, v, k, v, is_causal=True, query_chunk=4, key_chunk=4),
}


@pytest.mark.parametrize("name,mode", _params(sorted(SEQ_PRIMITIVES)))
def test_sequence_primitive_strict(mode, name):
  q, k, v, m = _seq_inputs()
  f = SEQ_PRIMITIVES[name]
  with strict_mode(mode):
    out = f(q, k, v, m)
    g = jax.grad(lambda q, k, v: jnp.sum(f(q, k, v, m) ** 2),
                 argnums=(0, 1, 2))(q, k, v)
  assert np.all(np.isfinite(np.asarray(out)))
  assert all(np.all(np.isfinite(np.asarray(x))) for x in g)


def test_moh_gates_strict():
  logits = jax.random.normal(jax.random.key(2), (B, T, N + 2))
  for mode in STRICT_MODES:
    with strict_mode(mode):
      jax.grad(lambda z: sq.moh_gates(z, num_shared_heads=1,
                                      num_active_heads=2)[1])(logits)


# ---------------------------------------------------------------- spatial

def _sp_inputs(shape=(1, 4, 4, 2, 4)):
  ks = jax.random.split(jax.random.key(3), 3)
  return tuple(jax.random.normal(x, shape, jnp.float32) for x in ks)


SP_PRIMITIVES = {
    "neighborhood_attention": lambda q, k, v: sp.neighborhood_attention(
        q, k, v, 3, is_causal=(True, False)),
    "window_attention_shifted": lambda q, k, v: sp.window_attention(
        q, k, v, 2, shift_size=1),
    "grid_attention": lambda q, k, v: sp.grid_attention(q, k, v, 2),
    "axial_attention": lambda q, k, v: sp.axial_attention(
        q, k, v, 1, is_causal=True),
    "cross_shaped_window_attention": lambda q, k, v:
        sp.cross_shaped_window_attention(
            q, k, v, 2, lepe_kernel=jnp.ones((3, 3, 2, 4)) / 9,
            lepe_bias=jnp.zeros((2, 4))),
    "pooled_attention": lambda q, k, v: sp.pooled_attention(q, k, v, (2, 2)),
    "subsampled_attention": lambda q, k, v: sp.subsampled_attention(
        q, k[:, ::2, ::2], v[:, ::2, ::2]),
    "bi_level_routing_attention": lambda q, k, v:
        sp.bi_level_routing_attention(q, k, v, 2, 2, scale=0.5),
    "channel_attention": lambda q, k, v: sp.channel_attention(q, k, v),
    "gated_positional_attention": lambda q, k, v:
        sp.gated_positional_attention(
            q, k, v, jnp.ones((3, 2)), jnp.zeros((2,)), jnp.zeros((2,))),
    "cls_cross_attention": lambda q, k, v: sp.cls_cross_attention(
        q.reshape(1, 16, 2, 4)[:, :1], k.reshape(1, 16, 2, 4),
        v.reshape(1, 16, 2, 4)),
}


@pytest.mark.parametrize("name,mode", _params(sorted(SP_PRIMITIVES)))
def test_spatial_primitive_strict(mode, name):
  q, k, v = _sp_inputs()
  f = SP_PRIMITIVES[name]
  with strict_mode(mode):
    out = f(q, k, v)
    g = jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) ** 2),
                 argnums=(0, 1, 2))(q, k, v)
  assert np.all(np.isfinite(np.asarray(out)))
  assert all(np.all(np.isfinite(np.asarray(x))) for x in g)


def _layers():
  r = lambda: nnx.Rngs(0)
  return {
      "LinearAttention": (lambda: sq.LinearAttention(2, 8, rngs=r()), "seq"),
      "EfficientAttention": (lambda: sq.EfficientAttention(2, 8, rngs=r()),
                             "seq"),
      "PerformerAttention": (lambda: sq.PerformerAttention(
          2, 8, num_features=8, rngs=r()), "seq"),
      "SlidingWindowAttention": (lambda: sq.SlidingWindowAttention(
          2, 8, window_size=2, rngs=r()), "seq"),
      "MoBAAttention": (lambda: sq.MoBAAttention(2, 8, block_size=4, top_k=1,
                                                 rngs=r()), "seq"),
      "RoutingAttention": (lambda: sq.RoutingAttention(
          2, 8, region_size=4, top_k=1, rngs=r()), "seq"),
      "AgentAttention": (lambda: sq.AgentAttention(2, 8, num_agents=2,
                                                   rngs=r()), "seq"),
      "MoHAttention": (lambda: sq.MoHAttention(
          2, 8, num_shared_heads=1, num_active_heads=2,
          base_attention_fn=functools.partial(sq.sliding_window_attention,
                                              window_size=2),
          rngs=r()), "seq"),
      "TriplewiseAttention": (lambda: sq.TriplewiseAttention(
          2, 8, query_chunk=4, key_chunk=4, rngs=r()), "tri"),
      "WindowAttention": (lambda: sp.WindowAttention(8, 2, 2, shift_size=1,
                                                     rngs=r()), "img"),
      "GridAttention": (lambda: sp.GridAttention(8, 2, 2, rngs=r()), "img"),
      "NeighborhoodAttention": (lambda: sp.NeighborhoodAttention(
          8, 2, 3, rngs=r()), "img"),
      "AxialAttention": (lambda: sp.AxialAttention(8, 2, rngs=r()), "img"),
      "CSWinAttention": (lambda: sp.CSWinAttention(8, 2, 2, rngs=r()), "img"),
      "GlobalSubsampledAttention": (lambda: sp.GlobalSubsampledAttention(
          8, 2, 2, rngs=r()), "img"),
      "LocallyGroupedAttention": (lambda: sp.LocallyGroupedAttention(
          8, 2, 2, rngs=r()), "img"),
      "HiLoAttention": (lambda: sp.HiLoAttention(8, 2, 2, rngs=r()), "img"),
      "BiLevelRoutingAttention": (lambda: sp.BiLevelRoutingAttention(
          8, 2, 2, 2, rngs=r()), "img"),
      "ChannelAttention": (lambda: sp.ChannelAttention(8, 2, rngs=r()),
                           "img"),
      "GPSA": (lambda: sp.GPSA(8, 4, rngs=r()), "img"),
      "CrossViTAttention": (lambda: sp.CrossViTAttention(8, 2, rngs=r()),
                            "tok"),
      "CrossViTFusion": (lambda: sp.CrossViTFusion(8, 12, 2, rngs=r()),
                         "fuse"),
  }


def _layer_loss(kind, x):
  mask = (jnp.arange(T) < 6)[None, None, None, :]
  if kind == "seq":
    return lambda m: jnp.sum(m(x, mask=mask) ** 2)
  if kind == "tri":
    return lambda m: jnp.sum(m(x, is_causal=True) ** 2)
  if kind == "img":
    xi = x.reshape(1, 4, 4, 8)
    return lambda m: jnp.sum(m(xi) ** 2)
  if kind == "tok":
    return lambda m: jnp.sum(m(x[:, :5]) ** 2)
  xb = jnp.ones((x.shape[0], 4, 12), jnp.float32)
  return lambda m: jnp.sum(m(x[:, :5], xb) ** 2)


@pytest.mark.parametrize("name,mode", _params(sorted(_layers())))
def test_layer_strict(mode, name):
  make, kind = _layers()[name]
  layer = make()
  x = jax.random.normal(jax.random.key(4), (2 if kind != "img" else 1,
                                            T if kind != "img" else 16, 8))
  loss = _layer_loss(kind, x)
  with strict_mode(mode):
    grads = nnx.grad(loss)(layer)
  for g in jax.tree.leaves(nnx.state(grads, nnx.Param)):
    assert np.all(np.isfinite(np.asarray(g)))
