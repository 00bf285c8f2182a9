"""neighborhood_attention 'xla', NeighborhoodXLA(row_loop=True) (issue 22
item 3): one row of tiles per loop step. Structure, not timings: nothing
outside the loop is larger than the inputs by more than the key rows'
overlap (the all-tiles path holds [tiles, heads, 49, 169] logits and
3.4x-duplicated key runs for the whole image); values and gradients of both
paths vs the reference; the loop is opt-in (measured not faster on CPU).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.spatial.neighborhood import (NeighborhoodXLA,
                                          neighborhood_attention,
                                          neighborhood_attention_reference)
from experiments import bench_utils


def _qkv(shape, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  return tuple(jax.random.normal(k, shape, jnp.float32) for k in ks)


def _largest_outside_loops(fn, *args):
  """Elements of the largest value computed by a top-level equation (loop
  bodies not entered)."""
  jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
  big = 0
  for eqn in jaxpr.eqns:
    for v in eqn.outvars:
      big = max(big, int(np.prod(v.aval.shape)))
  return big


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
def test_row_loop_holds_no_full_image_tile_intermediates(mode):
  # tall image: a row of tiles (what one loop step holds, and loop-invariant
  # masks hoisted out of the loop) is small next to the whole image
  q, k, v = _qkv((1, 98, 14, 2, 8))
  fn = lambda q, k, v: neighborhood_attention(
      q, k, v, 7, implementation=NeighborhoodXLA(row_loop=True))
  old = lambda q, k, v: neighborhood_attention(
      q, k, v, 7, implementation=NeighborhoodXLA(row_loop=False))
  if mode == "fwd_bwd":
    fn, old = bench_utils.fwd_bwd(fn), bench_utils.fwd_bwd(old)
  # key rows for 7-row tiles: 13 / 7 = 1.86x the keys; allow 2.5x
  assert _largest_outside_loops(fn, q, k, v) <= 2.5 * q.size
  # the all-tiles path holds logits of 169 / 16 ~ 10.6x the query's size
  assert _largest_outside_loops(old, q, k, v) > 8 * q.size


@pytest.mark.parametrize("row_loop", [True, False])
def test_row_loop_and_all_tiles_match_reference(row_loop):
  # 2D, dilation on axis 0 (two groups, several tile rows each), stride,
  # causal axis 1, rpb: values and gradients of both paths.
  q, k, v = _qkv((1, 13, 11, 2, 4))
  rpb = jax.random.normal(jax.random.key(5), (2, 9, 9))
  kw = dict(stride=(1, 2), dilation=(2, 1), is_causal=(False, True), rpb=rpb)
  impl = NeighborhoodXLA(tile_size=3, row_loop=row_loop)
  ct = jax.random.normal(jax.random.key(7), q.shape)

  def loss(f, *a):
    return jnp.sum(f(*a) * ct)

  f = lambda q, k, v, rpb: neighborhood_attention(
      q, k, v, 5, implementation=impl, **dict(kw, rpb=rpb))
  r = lambda q, k, v, rpb: neighborhood_attention_reference(
      q, k, v, 5, **dict(kw, rpb=rpb))
  np.testing.assert_allclose(jax.jit(f)(q, k, v, rpb), r(q, k, v, rpb),
                             atol=2e-6, rtol=2e-6)
  g = jax.jit(jax.grad(lambda *a: loss(f, *a), (0, 1, 2, 3)))(q, k, v, rpb)
  gr = jax.grad(lambda *a: loss(r, *a), (0, 1, 2, 3))(q, k, v, rpb)
  for a, b in zip(g, gr):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def _has_loop(fn, *args):
  return any(e.primitive.name in ("scan", "while")
             for e in jax.make_jaxpr(fn)(*args).jaxpr.eqns)


def test_row_loop_is_opt_in():
  fn = lambda q, k, v: neighborhood_attention(q, k, v, 7)
  loop = lambda q, k, v: neighborhood_attention(
      q, k, v, 7, implementation=NeighborhoodXLA(row_loop=True))
  x = jax.ShapeDtypeStruct((1, 56, 56, 4, 32), jnp.float32)
  assert not _has_loop(fn, x, x, x)
  assert _has_loop(loop, x, x, x)


def _logits_sized_ops(fn, args, elements):
  """Instructions of the compiled entry computation whose output has
  `elements` elements (each one is a pass that writes a logits-sized array
  out)."""
  import re
  txt = jax.jit(fn).lower(*args).compile().as_text()
  entry = txt[txt.index("ENTRY"):]
  count = 0
  for line in entry.splitlines():
    m = re.match(r"\s*(?:ROOT )?%\S+ = \w+\[([\d,]+)\]", line)
    if m and int(np.prod([int(d) for d in m.group(1).split(",")])) == elements:
      count += 1
  return count


def test_all_tiles_forward_writes_few_logits_sized_arrays():
  """The all-tiles forward writes out three [tiles, heads, 49, 169] arrays
  (the Q K^T product, the masked copy the row max reads, the masked exp
  that P V reads; the row sums come from a ones channel of V and the
  [49, Hv] output is normalized), not five (the old form also wrote the
  scaled logits and the normalized weights: fails on it)."""
  q, k, v = _qkv((1, 28, 28, 2, 8))
  fn = lambda q, k, v: neighborhood_attention(q, k, v, 7)
  logits = 16 * 2 * 49 * 169    # 4 x 4 tiles of 7 x 7 queries, 13 x 13 keys
  assert _logits_sized_ops(fn, (q, k, v), logits) <= 3
