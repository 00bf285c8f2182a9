"""CrossFormer LSDA (SDA groups / LDA intervals), DPB and cross-scale
embedding: float64 definition, reference, jit/vmap/grad, bf16, masks,
errors, layers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import spatial as sp
from tests.spatial.zoo_checks import (check_bf16, check_values_grads_jit_vmap,
                                      normal, softmax64)

SHAPE = (2, 7, 8, 4, 3)


def _lsda64(q, k, v, size, mode, rpb, key_mask, scale):
  """One query at a time: SDA keys share the G x G block, LDA keys lie a
  multiple of I away on both axes; bias by in-group index difference."""
  q, k, v, rpb = (np.asarray(x, np.float64) for x in (q, k, v, rpb))
  b_, h, w, n, _ = q.shape
  rep = n // k.shape[-2]
  eh = size if mode == "sda" else -(-h // size)
  ew = size if mode == "sda" else -(-w // size)
  inner = (lambda p: p % size) if mode == "sda" else (lambda p: p // size)
  same = ((lambda a, c: a // size == c // size) if mode == "sda"
          else (lambda a, c: (a - c) % size == 0))
  out = np.zeros(q.shape[:-1] + (v.shape[-1],))
  for bi in range(b_):
    for y in range(h):
      for x in range(w):
        keys = [(ky, kx) for ky in range(h) for kx in range(w)
                if same(y, ky) and same(x, kx)]
        for hd in range(n):
          lg = [scale * q[bi, y, x, hd] @ k[bi, ky, kx, hd // rep]
                + rpb[hd, inner(y) - inner(ky) + eh - 1, inner(x) - inner(kx) + ew - 1]
                for ky, kx in keys]
          ok = [bool(key_mask[bi, ky, kx]) for ky, kx in keys]
          p = softmax64(np.array(lg), np.array(ok))
          out[bi, y, x, hd] = p @ np.array([v[bi, ky, kx, hd // rep]
                                            for ky, kx in keys])
  return out


@pytest.mark.parametrize("mode,size,ext", [("sda", 3, (3, 3)), ("lda", 3, (3, 3))])
def test_matches_float64_definition(mode, size, ext):
  b, h, w, n, d = SHAPE
  q, k, v = normal(0, SHAPE), normal(1, (b, h, w, 2, d)), normal(2, (b, h, w, 2, d))
  rpb = normal(3, (n, 2 * ext[0] - 1, 2 * ext[1] - 1))
  km = jax.random.bernoulli(jax.random.key(4), 0.8, (b, h, w))
  want = _lsda64(q, k, v, size, mode, rpb, np.asarray(km), d ** -0.5)
  for f in (sp.lsda_attention, sp.lsda_attention_reference):
    np.testing.assert_allclose(f(q, k, v, size, mode=mode, rpb=rpb, key_mask=km),
                               want, atol=2e-5, rtol=2e-5)


def test_values_grads_jit_vmap_bf16():
  q, k, v = (normal(i, SHAPE) for i in range(3))
  rpb = normal(3, (4, 7, 7))
  fn = lambda q, k, v, r: sp.lsda_attention(q, k, v, 2, mode="lda", rpb=r)
  ref = lambda q, k, v, r: sp.lsda_attention_reference(q, k, v, 2, mode="lda",
                                                       rpb=r)
  check_values_grads_jit_vmap(fn, ref, (q, k, v, rpb), batched=(0, 1, 2, 3))
  check_bf16(lambda q, k, v: sp.lsda_attention(q, k, v, 3),
             lambda q, k, v: sp.lsda_attention_reference(q, k, v, 3), (q, k, v))


def test_masked_slots_and_empty_rows():
  q, k, v = (normal(i, SHAPE) for i in range(3))
  km = np.ones(SHAPE[:3], bool)
  km[0, 1, 2] = False
  km[1] = False
  km = jnp.asarray(km)
  kn = k.at[0, 1, 2].set(jnp.nan).at[1].set(jnp.inf)
  vn = v.at[0, 1, 2].set(jnp.nan).at[1].set(jnp.nan)
  for mode in ("sda", "lda"):
    f = lambda k, v: sp.lsda_attention(q, k, v, 3, mode=mode, key_mask=km)
    out = f(kn, vn)
    np.testing.assert_allclose(out, f(k, v), atol=1e-6)
    np.testing.assert_array_equal(out[1], 0.0)
    g = jax.grad(lambda k, v: f(k, v).sum(), argnums=(0, 1))(kn, vn)
    assert all(np.isfinite(np.asarray(x)).all() for x in g)


def test_errors():
  q, k, v = (normal(i, SHAPE) for i in range(3))
  with pytest.raises(ValueError, match="mode"):
    sp.lsda_attention(q, k, v, 3, mode="mid")
  with pytest.raises(ValueError, match="rpb.*\\(4, 5, 5\\).*lda"):
    sp.lsda_attention(q, k, v, 3, mode="lda", rpb=jnp.zeros((4, 3, 3)))
  with pytest.raises(ValueError, match="key_mask"):
    sp.lsda_attention(q, k, v, 3, key_mask=jnp.ones((2, 7), bool))
  with pytest.raises(ValueError, match="size"):
    sp.lsda_attention(q, k, v, 0)


def test_layers():
  layer = sp.LSDAttention(16, 4, 2, mode="lda", rngs=nnx.Rngs(0))
  x = normal(5, (1, 5, 6, 16))
  rpb = layer.pos((3, 3))
  assert rpb.shape == (4, 5, 5)
  # layer and reference in one compiled program (eager, each op was compiled
  # on its own)
  @nnx.jit
  def got_want(layer, x, rpb):
    qkv = layer.qkv(x).reshape(1, 5, 6, 3, 4, 4)
    want = sp.lsda_attention_reference(qkv[..., 0, :, :], qkv[..., 1, :, :],
                                       qkv[..., 2, :, :], 2, mode="lda",
                                       rpb=rpb, scale=0.5)
    return layer(x), layer.proj(want.reshape(x.shape))

  np.testing.assert_allclose(*got_want(layer, x, rpb), atol=1e-5)
  cel = sp.CrossScaleEmbedding(3, 64, rngs=nnx.Rngs(1))
  assert cel.channels == (32, 16, 8, 8)        # CrossFormer stage-1 split
  img = normal(6, (1, 32, 32, 3))
  y = cel(img)
  assert y.shape == (1, 8, 8, 64)
  # The 4x4 (stride 4, no padding) branch is a plain patch projection.
  c0 = cel.convs[0]
  patches = img.reshape(1, 8, 4, 8, 4, 3).transpose(0, 1, 3, 2, 4, 5)
  proj = jnp.einsum("bhwijc,ijco->bhwo", patches, c0.kernel[...]) + c0.bias[...]
  np.testing.assert_allclose(c0(img), proj, atol=1e-4)
