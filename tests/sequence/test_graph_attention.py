"""GAT / GATv2 segment-softmax aggregation vs a float64 NumPy evaluation on the
dense adjacency; padded edges, grads, bf16, vmap, memory linear in edges,
errors and the NNX layer."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.sequence import graph_attention as ga

N, H, F = 7, 2, 5
# (source, target); node 6 has no incoming edge, (2, 1) is duplicated.
EDGES = np.array([[0, 1], [2, 1], [2, 1], [3, 1], [1, 0], [4, 0], [0, 0],
                  [5, 2], [6, 2], [1, 3], [2, 3], [3, 3], [4, 3], [6, 4],
                  [0, 5], [5, 5], [3, 2], [4, 1]], np.int32)


def _np_graph(version, xs, xd, attn, edges, slope=0.2):
  xs, xd = np.asarray(xs, np.float64), np.asarray(xd, np.float64)
  attn = {k: np.asarray(v, np.float64) for k, v in attn.items()}
  n = xd.shape[0]
  adj = np.zeros((n, xs.shape[0]))
  for j, i in edges:
    adj[i, j] += 1.0
  lrelu = lambda z: np.where(z > 0, z, slope * z)
  out = np.zeros((n,) + xs.shape[1:])
  for h in range(xs.shape[1]):
    if version == "gat":
      e = lrelu((xd[:, h] @ attn["a_dst"][h])[:, None] +
                (xs[:, h] @ attn["a_src"][h])[None, :])
    else:
      e = lrelu(xd[:, None, h] + xs[None, :, h]) @ attn["a"][h]
    for i in range(n):
      if adj[i].sum() == 0:
        continue
      w = adj[i] * np.exp(e[i] - e[i][adj[i] > 0].max())
      out[i, h] = (w / w.sum()) @ xs[:, h]
  return out


def _data(seed=0, dtype=jnp.float32):
  ks = jax.random.split(jax.random.key(seed), 5)
  return (jax.random.normal(ks[0], (N, H, F), dtype),
          jax.random.normal(ks[1], (N, H, F), dtype),
          jax.random.normal(ks[2], (H, F)), jax.random.normal(ks[3], (H, F)),
          jax.random.normal(ks[4], (H, F)))


def _both(xs, xd, a1, a2, a, edges, edge_mask=None, ref=False):
  g1 = ga.gat_attention_reference if ref else ga.gat_attention
  g2 = ga.gatv2_attention_reference if ref else ga.gatv2_attention
  return (g1(xs, a1, a2, edges, edge_mask=edge_mask),
          g2(xs, xd, a, edges, edge_mask=edge_mask))


def test_match_float64_dense_adjacency_and_empty_nodes():
  xs, xd, a1, a2, a = _data()
  got = jax.jit(_both)(xs, xd, a1, a2, a, EDGES)
  want = (_np_graph("gat", xs, xs, {"a_src": a1, "a_dst": a2}, EDGES),
          _np_graph("gatv2", xs, xd, {"a": a}, EDGES))
  ref = _both(xs, xd, a1, a2, a, EDGES, ref=True)
  for g, w, r in zip(got, want, ref):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(r, w, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(g[6], 0.0)     # no incoming edges
  # GATv2 attention is dynamic: the ranking of neighbours depends on the
  # query node; the two versions differ.
  assert not np.allclose(got[0], got[1])


def test_padded_edges_change_nothing_and_grads_match_reference():
  xs, xd, a1, a2, a = _data(1)
  pad = np.array([[1000, 3], [-5, 2], [2, 99], [0, 1]], np.int32)
  edges = np.concatenate([EDGES, pad])
  mask = np.arange(len(edges)) < len(EDGES)
  w = jax.random.normal(jax.random.key(9), (2, N, H, F))

  def loss(ref, xs, xd, a1, a2, a, edges, mask):
    o = _both(xs, xd, a1, a2, a, edges, mask, ref=ref)
    return jnp.sum(o[0] * w[0]) + jnp.sum(o[1] * w[1])

  grad = jax.jit(jax.value_and_grad(functools.partial(loss, False),
                                    argnums=(0, 1, 2, 3, 4)))
  v_pad, g_pad = grad(xs, xd, a1, a2, a, edges, mask)
  v, g = grad(xs, xd, a1, a2, a, EDGES, np.ones(len(EDGES), bool))
  np.testing.assert_allclose(v_pad, v, rtol=1e-6)
  for x, y in zip(g_pad, g):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)
  g_ref = jax.grad(functools.partial(loss, True), argnums=(0, 1, 2, 3, 4))(
      xs, xd, a1, a2, a, EDGES, None)
  for x, y in zip(g, g_ref):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


def test_bfloat16_and_vmap_over_graphs():
  xs, xd, a1, a2, a = _data(2)
  got = _both(xs.astype(jnp.bfloat16), xd.astype(jnp.bfloat16), a1, a2, a,
              EDGES)
  want = _both(xs, xd, a1, a2, a, EDGES)
  for g, w in zip(got, want):
    assert g.dtype == jnp.bfloat16
    np.testing.assert_allclose(g.astype(jnp.float32), w, atol=5e-2, rtol=5e-2)
  xb = jnp.stack([xs, xd])
  edges_b = np.stack([EDGES, EDGES[::-1]])
  vm = jax.vmap(lambda x, e: ga.gat_attention(x, a1, a2, e))(xb, edges_b)
  for i in range(2):
    np.testing.assert_allclose(vm[i], ga.gat_attention(xb[i], a1, a2,
                                                       edges_b[i]),
                               rtol=1e-6, atol=1e-6)


def test_memory_is_linear_in_edges():
  n, e = 4096, 8192
  xs = jax.ShapeDtypeStruct((n, 1, 8), jnp.float32)
  a = jax.ShapeDtypeStruct((1, 8), jnp.float32)
  edges = jax.ShapeDtypeStruct((e, 2), jnp.int32)
  for fn in (lambda x, a, ed: ga.gat_attention(x, a, a, ed),
             lambda x, a, ed: ga.gatv2_attention(x, x, a, ed)):
    mem = jax.jit(fn).lower(xs, a, edges).compile().memory_analysis()
    total = (mem.temp_size_in_bytes + mem.argument_size_in_bytes +
             mem.output_size_in_bytes)
    assert total < 64 * e * 8 * 4, total        # an [N, N] array is 64 MiB
    assert total < n * n * 4 / 16


def test_value_errors_name_arguments():
  xs, xd, a1, a2, a = _data()
  with pytest.raises(ValueError, match=r"`edges`.*\[num_edges, 2\].*\(18,\)"):
    ga.gat_attention(xs, a1, a2, EDGES[:, 0])
  with pytest.raises(ValueError, match=r"`edges` index out of range.*\[7\]"):
    ga.gat_attention(xs, a1, a2, np.array([[0, 7]]))
  with pytest.raises(ValueError, match=r"`a_src`.*\(2, 4\)"):
    ga.gat_attention(xs, a1[:, :4], a2, EDGES)
  with pytest.raises(ValueError, match=r"`x_src`.*\(7, 10\)"):
    ga.gatv2_attention(xs.reshape(N, -1), xd, a, EDGES)
  with pytest.raises(ValueError, match=r"`edge_mask`.*\(3,\)"):
    ga.gatv2_attention(xs, xd, a, EDGES, edge_mask=np.ones(3, bool))
  with pytest.raises(ValueError, match="edges.*integer"):
    ga.gat_attention(xs, a1, a2, EDGES.astype(np.float32))


@pytest.mark.parametrize("version", ["gat", "gatv2"])
def test_layer(version):
  layer = ga.GraphAttention(6, F, H, version=version, self_loops=True,
                            rngs=nnx.Rngs(0))
  h = jax.random.normal(jax.random.key(3), (N, 6))
  y = nnx.jit(lambda m, h: m(h, EDGES))(layer, h)
  assert y.shape == (N, H * F)
  loops = ga.add_self_loops(EDGES, N)
  xs = (h @ layer.w_src.value).reshape(N, H, F)
  if version == "gat":
    want = _np_graph("gat", xs, xs, {"a_src": layer.a_src.value,
                                     "a_dst": layer.a_dst.value}, loops)
  else:
    xd = (h @ layer.w_dst.value).reshape(N, H, F)
    want = _np_graph("gatv2", xs, xd, {"a": layer.a.value}, loops)
  np.testing.assert_allclose(y, want.reshape(N, -1), rtol=1e-5, atol=1e-5)
  g = nnx.grad(lambda m: jnp.sum(jnp.tanh(m(h, EDGES))))(layer)
  leaves = jax.tree.leaves(nnx.state(g, nnx.Param))
  assert all(bool(jnp.all(jnp.isfinite(l))) and float(jnp.max(jnp.abs(l))) > 0
             for l in leaves)
  mean_layer = ga.GraphAttention(6, F, H, version=version, concat=False,
                                 rngs=nnx.Rngs(0))
  assert mean_layer(h, EDGES).shape == (N, F)
