"""Set Transformer blocks (MAB/SAB/ISAB/PMA) vs a float64 NumPy evaluation of
the paper's equations; masks, masked-slot invariance, grads, bf16, jit/vmap,
errors and the NNX layers."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.sequence import set_transformer as st

B, N_SET, DIM, HEADS = 2, 7, 8, 2
LENGTHS = (5, 0)          # second set is empty: attention term must vanish


def _np_mab(x, y, p, heads, kv_mask=None, q_mask=None, ln=True):
  p = {k: np.asarray(v, np.float64) for k, v in p.items()}
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  if kv_mask is not None:
    y = np.where(kv_mask[..., None], y, 0.0)
  if q_mask is not None:
    x = np.where(q_mask[..., None], x, 0.0)
  d = p["wq"].shape[1]
  e = d // heads
  out = []
  for bi in range(x.shape[0]):
    q = x[bi] @ p["wq"] + p["bq"]
    k = y[bi] @ p["wk"] + p["bk"]
    v = y[bi] @ p["wv"] + p["bv"]
    o = np.zeros((x.shape[1], d))
    keep = (np.ones(y.shape[1], bool) if kv_mask is None else kv_mask[bi])
    for j in range(heads):
      sl = slice(j * e, (j + 1) * e)
      s = q[:, sl] @ k[keep, sl].T / np.sqrt(e)
      if keep.any():
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        o[:, sl] = a @ v[keep, sl]
    h = x[bi] + o @ p["wo"] + p["bo"]

    def lnorm(z, i):
      mu = z.mean(-1, keepdims=True)
      var = ((z - mu) ** 2).mean(-1, keepdims=True)
      return (z - mu) / np.sqrt(var + 1e-5) * p[f"ln{i}_scale"] + p[f"ln{i}_bias"]
    if ln:
      h = lnorm(h, 1)
    r = h + np.maximum(h @ p["w1"] + p["b1"], 0) @ p["w2"] + p["b2"]
    if ln:
      r = lnorm(r, 2)
    if q_mask is not None:
      r = np.where(q_mask[bi][:, None], r, 0.0)
    out.append(r)
  return np.stack(out)


def _params(seed, dim_y=DIM, ln=True):
  p = st.init_mab_params(jax.random.key(seed), DIM, dim_y, ff_dim=12,
                         layer_norm=ln)
  # non-trivial biases and LayerNorm affine parameters
  ks = iter(jax.random.split(jax.random.key(seed + 100), len(p)))
  return {k: (v if k.startswith("w") else
              v + 0.3 * jax.random.normal(next(ks), v.shape)) for k, v in p.items()}


def _data(seed=0, n=N_SET, dim=DIM):
  x = jax.random.normal(jax.random.key(seed), (B, n, dim))
  mask = jnp.arange(n)[None, :] < jnp.asarray(LENGTHS)[:, None]
  return x, mask


P1, P2 = _params(1), _params(2)
IND = jax.random.normal(jax.random.key(3), (3, DIM))
SEEDS = jax.random.normal(jax.random.key(4), (2, DIM))
RFF = (jax.random.normal(jax.random.key(5), (DIM, DIM)) / 3,
       0.1 * jnp.ones((DIM,)))


def _np_blocks(x, mask):
  m = np.asarray(mask)
  sab = _np_mab(x, x, P1, HEADS, m, m)
  ind = np.broadcast_to(np.asarray(IND), (B,) + IND.shape)
  h = _np_mab(ind, x, P1, HEADS, m)
  isab = _np_mab(x, h, P2, HEADS, None, m)
  z = np.maximum(np.asarray(x, np.float64) @ np.asarray(RFF[0], np.float64)
                 + np.asarray(RFF[1]), 0)
  seeds = np.broadcast_to(np.asarray(SEEDS), (B,) + SEEDS.shape)
  pma = _np_mab(seeds, z, P1, HEADS, m)
  return sab, isab, pma


def _blocks(x, mask, ref=False, p1=None):
  p1 = P1 if p1 is None else p1
  sab = st.sab_reference if ref else st.sab
  isab = st.isab_reference if ref else st.isab
  pma = st.pma_reference if ref else st.pma
  return (sab(x, p1, num_heads=HEADS, mask=mask),
          isab(x, IND, p1, P2, num_heads=HEADS, mask=mask),
          pma(x, SEEDS, p1, num_heads=HEADS, mask=mask, rff=RFF))


def test_blocks_match_float64_numpy_with_masks_and_empty_sets():
  x, mask = _data()
  got = jax.jit(_blocks)(x, mask)
  want = _np_blocks(x, mask)
  for g, w, name in zip(got, want, ("sab", "isab", "pma")):
    np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5, err_msg=name)
  # padded rows of SAB/ISAB output are zeros; the empty set's PMA equals the
  # block with a zero attention term (checked by the NumPy reference above).
  np.testing.assert_array_equal(got[0][0, 5:], 0.0)
  np.testing.assert_array_equal(got[0][1], 0.0)
  np.testing.assert_array_equal(got[1][1], 0.0)
  # no mask: unmasked MAB against NumPy without LayerNorm, cross widths.
  p = _params(6, dim_y=5, ln=False)
  y = jax.random.normal(jax.random.key(7), (B, 4, 5))
  np.testing.assert_allclose(
      st.mab(x, y, p, num_heads=HEADS, layer_norm=False),
      _np_mab(x, y, p, HEADS, ln=False), rtol=2e-5, atol=2e-5)


def test_gradients_match_reference_and_vanish_on_padding():
  x, mask = _data(1)
  w = [jax.random.normal(jax.random.key(i), o.shape)     # shapes only
       for i, o in enumerate(jax.eval_shape(_blocks, x, mask))]

  def loss(ref, x, p):
    outs = _blocks(x, mask, ref, p)
    return sum(jnp.sum(o * wi) for o, wi in zip(outs, w))

  g = jax.jit(jax.grad(functools.partial(loss, False), argnums=(0, 1)))(x, P1)
  r = jax.jit(jax.grad(functools.partial(loss, True), argnums=(0, 1)))(x, P1)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(r)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(g[0][0, 5:], 0.0)
  np.testing.assert_array_equal(g[0][1], 0.0)


def test_masked_slot_invariance_nan_inf():
  x, mask = _data(2)

  def f(x):
    outs = _blocks(x, mask)
    return outs, jax.grad(lambda x: sum(jnp.sum(o ** 2)
                                        for o in _blocks(x, mask)))(x)

  f = jax.jit(f)
  clean_out, clean_g = f(x)
  for poison in (np.nan, np.inf, -np.inf):
    bad = jnp.where(mask[..., None], x, poison)
    out, g = f(bad)
    for a, b in zip(out, clean_out):
      np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(g, clean_g)


def test_bfloat16_and_vmap():
  x, mask = _data(3)
  # compiled (eager, every op of the blocks was compiled on its own)
  got = jax.jit(_blocks)(x.astype(jnp.bfloat16), mask)
  want = jax.jit(_blocks)(x, mask)
  for g, w in zip(got, want):
    assert g.dtype == jnp.bfloat16
    np.testing.assert_allclose(g.astype(jnp.float32), w, atol=6e-2, rtol=6e-2)
  vm = jax.jit(jax.vmap(_blocks))(x, mask)
  for a, b in zip(vm, want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_value_errors_name_arguments():
  x, mask = _data()
  with pytest.raises(ValueError, match=r"`x`.*\(7,\)"):
    st.sab(x[0, :, 0], P1, num_heads=HEADS)
  with pytest.raises(ValueError, match=r"`mask`.*\[2, 7\]"):
    st.sab(x, P1, num_heads=HEADS, mask=mask[:, :5])
  with pytest.raises(ValueError, match=r"params\['wk'\].*\[5, 8\]"):
    st.mab(x, x[..., :5], P1, num_heads=HEADS)
  with pytest.raises(ValueError, match="num_heads"):
    st.sab(x, P1, num_heads=3)
  with pytest.raises(ValueError, match=r"`inducing`.*\(3, 4\)"):
    st.isab(x, IND[:, :4], P1, P2, num_heads=HEADS)
  with pytest.raises(ValueError, match="batch sizes"):
    st.mab(x, x[:1], P1, num_heads=HEADS)
  with pytest.raises(ValueError, match="implementation"):
    st.sab(x, P1, num_heads=HEADS, implementation="pallas")


def test_layers_equal_functional_blocks_and_train():
  x, mask = _data(4)
  rngs = nnx.Rngs(0)
  layers = [st.SAB(DIM, HEADS, rngs=rngs), st.ISAB(DIM, HEADS, 3, rngs=rngs),
            st.PMA(DIM, HEADS, 2, rngs=rngs)]
  sab, isab, pma = layers
  np.testing.assert_allclose(
      sab(x, mask=mask), st.sab(x, sab.block.as_dict(), num_heads=HEADS,
                                mask=mask), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(
      isab(x, mask=mask),
      st.isab(x, isab.inducing.value, isab.block_in.as_dict(),
              isab.block_out.as_dict(), num_heads=HEADS, mask=mask),
      rtol=1e-6, atol=1e-6)
  y = nnx.jit(lambda m, x: m(x, mask=mask))(pma, x)
  assert y.shape == (B, 2, DIM)
  mab = st.MAB(DIM, HEADS, dim_y=5, rngs=rngs)
  assert mab(x, x[..., :5]).shape == (B, N_SET, DIM)
  for layer in layers:
    g = nnx.grad(lambda m: jnp.sum(m(x, mask=mask) ** 2))(layer)
    leaves = jax.tree.leaves(nnx.state(g, nnx.Param))
    assert leaves and all(bool(jnp.all(jnp.isfinite(l))) for l in leaves)
    assert any(float(jnp.max(jnp.abs(l))) > 0 for l in leaves)
  # permutation equivariance of SAB, invariance of PMA (the paper's claims)
  perm = jnp.array([4, 2, 0, 3, 1, 5, 6])
  np.testing.assert_allclose(sab(x[:, perm], mask=mask)[:, :5],
                             sab(x, mask=mask)[:, perm][:, :5], rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(pma(x[:, perm], mask=mask), pma(x, mask=mask),
                             rtol=1e-5, atol=1e-5)
