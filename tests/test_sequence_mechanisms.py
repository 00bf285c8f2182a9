"""Sequence-family mechanisms vs their references: the four patterns (and the
SUPPORT table, also against docs/sequence.md), gradients, bfloat16,
jit/vmap, key-padding masks, errors, and mechanism-specific properties."""

import functools
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attnjax
from attnjax import sequence as sq

B, T, N, K, H, HV = 2, 12, 4, 2, 8, 6
S_CROSS = 9
PROJ = sq.orthogonal_random_features(jax.random.key(7), 16, H)
GATES = jax.nn.sigmoid(jax.random.normal(jax.random.key(8), (B, T, N)))
W_ADD = jax.random.normal(jax.random.key(9), (N, H))
RC_KW = dict(rel_embeddings=jax.random.normal(jax.random.key(10), (5, N, H)),
             conv_q=jax.random.normal(jax.random.key(11), (3, N, H)),
             conv_k=jax.random.normal(jax.random.key(12), (3, K, H)),
             conv_v=jax.random.normal(jax.random.key(13), (3, K, HV)))


def _tri(fn):
  # Triple-wise attention on the same pair of sequences twice (k2 = -k/2).
  def call(q, k, v, **kw):
    return fn(q, k, v, -0.5 * k, jnp.flip(v, axis=-1), **kw)
  return call


def _moh(q, k, v, **kw):
  return sq.mixture_of_heads_attention(q, k, v, GATES[:, :q.shape[-3]], **kw)


def _moh_ref(q, k, v, **kw):
  o = attnjax.dot_product_attention(q, k, v, implementation="xla", **kw)
  return o * GATES[:, :q.shape[-3], :, None].astype(o.dtype)


# name -> (primitive, reference, static kwargs, supports key-padding masks)
CASES = {
    "linear_attention": (
        functools.partial(sq.linear_attention, chunk_size=4),
        sq.linear_attention_reference, {}, True),
    "efficient_attention": (sq.efficient_attention,
                            sq.efficient_attention_reference, {}, True),
    "performer_attention": (
        functools.partial(sq.performer_attention, projection=PROJ, chunk_size=4),
        functools.partial(sq.performer_attention_reference, projection=PROJ),
        {}, True),
    "sliding_window_attention": (
        functools.partial(sq.sliding_window_attention, block_size=4),
        sq.sliding_window_attention_reference, {"window_size": (3, 2)}, True),
    "block_sparse_attention": (
        sq.block_sparse_attention, sq.block_sparse_attention_reference,
        {"layout": np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0]], bool),
         "block_size": 4}, True),
    "moba_attention": (sq.moba_attention, sq.moba_attention_reference,
                       {"block_size": 4, "top_k": 2}, True),
    "routing_attention": (sq.routing_attention, sq.routing_attention_reference,
                          {"region_size": 4, "top_k": 2}, True),
    "agent_attention": (sq.agent_attention, sq.agent_attention_reference,
                        {"num_agents": 3}, True),
    "mixture_of_heads_attention": (_moh, _moh_ref, {}, True),
    "triplewise_attention": (
        _tri(functools.partial(sq.triplewise_attention, query_chunk=5,
                               key_chunk=4)),
        _tri(sq.triplewise_attention_reference), {}, False),
    "additive_attention": (
        functools.partial(sq.additive_attention, weight=W_ADD),
        functools.partial(sq.additive_attention_reference, weight=W_ADD), {},
        True),
    "rcmha_attention": (functools.partial(sq.rcmha_attention, **RC_KW),
                        functools.partial(sq.rcmha_attention_reference,
                                          **RC_KW), {}, True),
    "key_driven_gqa": (
        functools.partial(sq.key_driven_gqa, group_over="example"),
        functools.partial(sq.key_driven_gqa_reference, group_over="example"),
        {}, True),
    "lambda_attention": (sq.lambda_attention, sq.lambda_attention_reference,
                         {}, True),
}


def _inputs(t=T, s=T, dtype=jnp.float32, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(ks[0], (B, t, N, H), dtype),
          jax.random.normal(ks[1], (B, s, K, H), dtype),
          jax.random.normal(ks[2], (B, s, K, HV), dtype))


# References that compute with NumPy on concrete values (key_driven_gqa's
# allocates heads per example with the authors' loop): not traceable, so
# they run eagerly.
EAGER_REFERENCES = frozenset({"key_driven_gqa"})


def _together(name, prim, ref, *args):
  """prim(*args) and ref(*args) in one compiled program (one compile per
  check instead of one per side, and the reference not compiled op by op);
  a NumPy reference (EAGER_REFERENCES) runs eagerly beside the jitted
  primitive."""
  if name in EAGER_REFERENCES:
    return jax.jit(prim)(*args), ref(*args)
  return jax.jit(lambda *a: (prim(*a), ref(*a)))(*args)


def test_support_table_covers_every_mechanism():
  """Every SUPPORT entry has a full pattern row and is tested: by CASES here
  or (issue 20's mechanisms) by a tests/sequence/test_<module>.py that
  imports its function."""
  assert set(CASES) <= set(sq.SUPPORT)
  tests = "\n".join(p.read_text() for p in (
      pathlib.Path(__file__).parent / "sequence").glob("test_*.py"))
  untested = [name for name in set(sq.SUPPORT) - set(CASES)
              if name not in tests]
  assert not untested, untested
  for name, table in sq.SUPPORT.items():
    assert set(table) == set(sq.PATTERNS), name


def test_docs_table_matches_code():
  doc = (pathlib.Path(__file__).parents[1] / "docs" / "sequence.md").read_text()
  table = doc.split("## Support table", 1)[1].split("\n## ", 1)[0]
  seen = {}
  for line in table.splitlines():
    m = re.match(r"\|\s*`(\w+)`\s*\|(.*)\|\s*$", line)
    if m and m.group(1) in sq.SUPPORT:
      cells = [c.strip().lower() for c in m.group(2).split("|")][:4]
      seen[m.group(1)] = {p: c.startswith("yes") for p, c in
                          zip(sq.PATTERNS, cells)}
  assert seen == sq.SUPPORT


@pytest.mark.parametrize("name", sorted(CASES))
def test_four_patterns_match_reference_or_refuse(name):
  fn, ref, kw, _ = CASES[name]
  served = []
  for pattern in sq.PATTERNS:
    causal = pattern.startswith("causal")
    s = S_CROSS if pattern.endswith("cross") else T
    q, k, v = _inputs(s=s)
    # (kw as is: block_sparse with S_CROSS=9 still gives 3 key blocks of 4)
    if sq.SUPPORT[name][pattern]:
      served.append((pattern, causal, (q, k, v)))
    else:
      with pytest.raises(NotImplementedError, match="causal"):
        fn(q, k, v, is_causal=causal, **kw)

  # Every served pattern, primitive and reference, in one compiled program.
  def run(f):
    return lambda inputs: [f(*x, is_causal=causal, **kw)
                           for (_, causal, _), x in zip(served, inputs)]

  gots, wants = _together(name, run(fn), run(ref), [x for _, _, x in served])
  assert len(gots) == len(wants) == sum(sq.SUPPORT[name].values()) > 0
  for (pattern, _, _), got, want in zip(served, gots, wants):
    assert got.shape == (B, T, N, HV)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5,
                               err_msg=pattern)


def _best_pattern(name):
  return sq.SUPPORT[name]["causal_self"]


@pytest.mark.parametrize("name", sorted(CASES))
def test_gradients_match_reference(name):
  fn, ref, kw, _ = CASES[name]
  causal = _best_pattern(name)
  q, k, v = _inputs(t=8, s=8, seed=1)
  if name == "block_sparse_attention":
    kw = dict(kw, layout=kw["layout"][:2, :2])
  w = jax.random.normal(jax.random.key(2), (B, 8, N, HV))

  def loss(f, q, k, v):
    return jnp.sum(f(q, k, v, is_causal=causal, **kw) * w)

  g1, g2 = _together(
      name, *(jax.grad(functools.partial(loss, f), argnums=(0, 1, 2))
              for f in (fn, ref)), q, k, v)
  assert len(g1) == len(g2) == 3
  for a, b in zip(g1, g2):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", sorted(CASES))
def test_bfloat16(name):
  fn, ref, kw, _ = CASES[name]
  causal = _best_pattern(name)
  q, k, v = _inputs(dtype=jnp.bfloat16, seed=3)
  f32 = lambda x: x.astype(jnp.float32)

  # bfloat16 values and gradient, and the float32 reference
  def prim(q, k, v):
    got = fn(q, k, v, is_causal=causal, **kw)
    g = jax.grad(lambda q: jnp.sum(
        fn(q, k, v, is_causal=causal, **kw).astype(jnp.float32)))(q)
    return got, g

  (got, g), want = _together(
      name, prim, lambda q, k, v: ref(f32(q), f32(k), f32(v),
                                      is_causal=causal, **kw), q, k, v)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(f32(got), want, atol=4e-2, rtol=4e-2)
  assert g.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(f32(g))))


@pytest.mark.parametrize("name", sorted(CASES))
def test_vmap_over_batch_matches_batched(name):
  fn, ref, kw, _ = CASES[name]
  if name == "mixture_of_heads_attention":
    pytest.skip("gates carry their own batch dim")
  q, k, v = _inputs(seed=4)
  f = functools.partial(fn, is_causal=_best_pattern(name), **kw)
  vm, batched = jax.jit(lambda q, k, v: (jax.vmap(f)(q, k, v), f(q, k, v)))(
      q, k, v)                                     # one compiled program
  np.testing.assert_allclose(vm, batched, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(n for n, c in CASES.items() if c[3]))
def test_key_padding_mask_and_fully_masked_rows(name):
  fn, ref, kw, _ = CASES[name]
  q, k, v = _inputs(seed=5)
  valid = jnp.arange(T)[None, :] < jnp.array([7, 0])[:, None]
  mask = valid[:, None, None, :]
  causal = _best_pattern(name)
  got, want = _together(name, *(
      functools.partial(f, is_causal=causal, mask=mask, **kw)
      for f in (fn, ref)), q, k, v)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(got[1], 0.0)
  assert not np.any(np.isnan(got))


def test_value_errors_name_arguments():
  q, k, v = _inputs()
  for name, (fn, _, kw, _) in CASES.items():
    if name in ("triplewise_attention",):
      continue
    with pytest.raises(ValueError, match="head_dim"):
      fn(q, k[..., :5], v, **kw)
  with pytest.raises(ValueError, match="window_size"):
    sq.sliding_window_attention(q, k, v, window_size=-1)
  with pytest.raises(ValueError, match=r"layout.*\[3, 3\]"):
    sq.block_sparse_attention(q, k, v, np.ones((2, 3), bool), 4)
  with pytest.raises(ValueError, match="max_blocks_per_row"):
    jax.jit(lambda l: sq.block_sparse_attention(q, k, v, l, 4))(
        np.ones((3, 3), bool))
  with pytest.raises(ValueError, match="top_k"):
    sq.moba_attention(q, k, v, block_size=4, top_k=0)
  with pytest.raises(ValueError, match="region_size"):
    sq.routing_attention(q, k, v, region_size=0)
  with pytest.raises(ValueError, match="num_agents"):
    sq.agent_attention(q, k, v, num_agents=T + 1)
  with pytest.raises(ValueError, match="projection"):
    sq.performer_attention(q, k, v, jnp.ones((16, 5)))
  with pytest.raises(ValueError, match="key2"):
    sq.triplewise_attention(q, k, v, k[:, :, :, :5], v)
  with pytest.raises(NotImplementedError, match="key-padding"):
    sq.moba_attention(q, k, v, block_size=4, mask=jnp.ones((T, T), bool))


def test_performer_error_shrinks_with_features():
  q, k, v = _inputs(t=32, s=32, seed=6)
  q, k = 0.5 * q, 0.5 * k

  # one compiled program per (features, causal) (eager, every op was
  # compiled on its own for each shape)
  @functools.partial(jax.jit, static_argnums=(1, 2))
  def err(key, f, causal):
    exact = attnjax.dot_product_attention(q, k, v, is_causal=causal)
    return jnp.mean(jnp.abs(sq.performer_attention(
        q, k, v, sq.orthogonal_random_features(key, f, H),
        is_causal=causal) - exact))

  for causal in (False, True):
    errs = []
    for f in (8, 64, 512):
      e = [float(err(jax.random.key(r), f, causal)) for r in range(3)]
      errs.append(np.mean(e))
    assert errs[0] > errs[1] > errs[2], errs
    assert errs[2] < 0.5 * errs[0], errs


def test_orthogonal_features_are_orthogonal_within_blocks():
  w = sq.orthogonal_random_features(jax.random.key(0), 2 * H, H)
  for blk in (w[:H], w[H:]):
    gram = blk @ blk.T
    off = gram - jnp.diag(jnp.diag(gram))
    assert float(jnp.max(jnp.abs(off))) < 1e-4
  w2 = sq.orthogonal_random_features(jax.random.key(1), 2 * H, H)
  assert not np.allclose(w, w2)      # redraw with a new key differs


def test_moba_includes_own_block_and_is_causal():
  q, k, v = _inputs(t=16, s=16, seed=9)
  sel = sq.moba_selected_blocks(q, k, block_size=4, top_k=2, is_causal=True)
  pos = np.arange(16)
  own = np.zeros((16, 4), bool)
  own[pos, pos // 4] = True
  assert np.all(np.asarray(sel)[..., own])
  future = np.arange(4)[None, :] * 4 > pos[:, None]
  assert not np.any(np.asarray(sel)[..., future])
  assert np.all(np.asarray(sel).sum(-1) == np.minimum(2, pos // 4 + 1))
  out = sq.moba_attention(q, k, v, block_size=4, top_k=2, is_causal=True)
  k2 = k.at[:, 10:].set(9.0)
  v2 = v.at[:, 10:].set(9.0)
  out2 = sq.moba_attention(q, k2, v2, block_size=4, top_k=2, is_causal=True)
  np.testing.assert_allclose(out2[:, :10], out[:, :10], rtol=1e-6, atol=1e-6)


def test_sliding_window_is_linear_in_gathered_blocks():
  # The gathered engine touches O(T * window) keys: a far-away key cannot
  # change the output (and the dense reference agrees).
  q, k, v = _inputs(t=40, s=40, seed=10)
  out = sq.sliding_window_attention(q, k, v, 3, block_size=4)
  v2 = v.at[:, 30:].set(100.0)
  out2 = sq.sliding_window_attention(q, k, v2, 3, block_size=4)
  np.testing.assert_allclose(out2[:, :26], out[:, :26], rtol=1e-6, atol=1e-6)
  assert not np.allclose(out2[:, 28:], out[:, 28:])


LAYERS = [
    (sq.LinearAttention, dict(chunk_size=4), True),
    (sq.EfficientAttention, {}, False),
    (sq.SlidingWindowAttention, dict(window_size=3, block_size=4), True),
    (sq.MoBAAttention, dict(block_size=4, top_k=2), True),
    (sq.RoutingAttention, dict(region_size=4, top_k=2), True),
    (sq.AgentAttention, dict(num_agents=4), False),
    (sq.PerformerAttention, dict(num_features=16), True),
]


@pytest.mark.parametrize("cls,kw,causal", LAYERS,
                         ids=[c[0].__name__ for c in LAYERS])
def test_layers_plug_into_multihead_attention(cls, kw, causal):
  layer = cls(4, 16, num_kv_heads=2, head_dim=8, rngs=nnx.Rngs(0), **kw)
  x = jax.random.normal(jax.random.key(1), (2, 12, 16))

  # the layer, its parts composed by hand, the changed-future call and the
  # gradients in one compiled program
  def run(m, x):
    y = m(x, is_causal=causal)
    q, k, v = m.project_qkv(x)
    want = m.out(m.attend(q, k, v, is_causal=True) if causal
                 else m.attend(q, k, v))
    y2 = m(x.at[:, 9:].set(3.0), is_causal=True) if causal else None
    grads = nnx.grad(lambda m: jnp.sum(m(x, is_causal=causal) ** 2))(m)
    return y, want, y2, nnx.state(grads, nnx.Param)

  y, want, y2, grads = nnx.jit(run)(layer, x)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  if causal:
    np.testing.assert_allclose(y2[:, :9], y[:, :9], rtol=1e-5, atol=1e-5)
  assert jax.tree.leaves(grads)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_performer_layer_redraw_changes_projection_not_params():
  layer = sq.PerformerAttention(2, 8, num_features=8, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (1, 6, 8))
  y0 = layer(x)
  p0 = layer.projection.value
  layer.redraw(jax.random.key(5))
  assert not np.allclose(layer.projection.value, p0)
  assert not np.allclose(layer(x), y0)
  assert all(not isinstance(v, sq.RandomFeatures)
             for v in jax.tree.leaves(nnx.state(layer, nnx.Param)))
  assert len(jax.tree.leaves(nnx.state(layer, sq.RandomFeatures))) == 1
