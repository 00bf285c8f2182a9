"""neighborhood_attention 'xla' (issue 22 item 3). Structure, not timings.

Default: all tiles at once while their logits fit 4 MiB, above
that a loop over bands of tile rows with a custom VJP (`_band_loop`): values,
lse and gradients vs the reference (multi-step loop forced with
step_bytes=1), bf16 and vmap, no gather/scatter in forward+backward, compiled
temp memory at 112x112 under glibc's mmap-every-call size.
NeighborhoodXLA(row_loop=True) (opt-in): one row of tiles per loop step,
nothing outside the loop larger than the inputs by more than the key rows'
overlap; row_loop=False: the all-tiles path at every size.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.spatial.neighborhood import (NeighborhoodXLA,
                                          neighborhood_attention,
                                          neighborhood_attention_reference)
from experiments import bench_utils
from tests.spatial.zoo_checks import jit_vjp


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
  return bool({"scan", "while"} & _primitives(jax.make_jaxpr(fn)(*args).jaxpr))


def test_row_loop_is_opt_in_and_default_loops_only_on_large_maps():
  fn = lambda q, k, v: neighborhood_attention(q, k, v, 7)
  loop = lambda q, k, v: neighborhood_attention(
      q, k, v, 7, implementation=NeighborhoodXLA(row_loop=True))
  small = jax.ShapeDtypeStruct((1, 28, 28, 4, 32), jnp.float32)
  x = jax.ShapeDtypeStruct((1, 56, 56, 4, 32), jnp.float32)
  # 28x28: all 16 tiles' logits (2.1 MiB) in one step, no loop; 56x56: the
  # band loop (one tile row per step)
  assert not _has_loop(fn, small, small, small)
  assert _has_loop(fn, x, x, x)
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


# ----------------------------------------------------------------------------
# The default path: halo runs cut with static slices, a loop over bands of
# tile rows (issue 22 item 3, fifth session)
# ----------------------------------------------------------------------------

# (shape, kernel, kwargs, tile): every case runs with step_bytes=1, i.e. one
# tile row per loop step (the loop is entered at these tiny sizes).
BAND_CASES = [
    # 2D: dilation on axis 0, stride, causal axis 1, rpb, partial tiles
    ((1, 13, 11, 2, 4), 5, dict(stride=(1, 2), dilation=(2, 1),
                                is_causal=(False, True)), 3),
    # 2D: causal axis 0, dilation on axis 1, stride 3, batch 2, default tile
    ((2, 17, 12, 2, 4), 5, dict(stride=(3, 2), dilation=(1, 2),
                                is_causal=(True, False)), None),
    # 1D: dilation 3, stride 2
    ((1, 40, 2, 4), 5, dict(stride=2, dilation=3), 5),
    # 3D: causal last axis, dilation on axis 1
    ((1, 9, 10, 11, 2, 4), 3, dict(dilation=(1, 2, 1),
                                   is_causal=(False, False, True)), 3),
    # 2D: dilation on both axes (lengths not multiples of it: groups of
    # unequal length), stride 4 on axis 1, default (band) tiles, batch 2
    ((2, 23, 21, 2, 4), 5, dict(stride=(1, 4), dilation=(2, 3)), None),
    # 2D: dilation 2 and causal on axis 0, default tiles
    ((1, 26, 15, 2, 4), 5, dict(dilation=(2, 1),
                                is_causal=(True, False)), None),
]


@pytest.mark.parametrize("shape,kernel,kw,tile", BAND_CASES)
def test_band_loop_values_and_grads_vs_reference(shape, kernel, kw, tile):
  q, k, v = _qkv(shape)
  nd = len(shape) - 3
  rpb = jax.random.normal(jax.random.key(5), (2,) + (2 * kernel - 1,) * nd)
  impl = NeighborhoodXLA(tile_size=tile, step_bytes=1)
  ct = jax.random.normal(jax.random.key(7), q.shape)
  ct_lse = jax.random.normal(jax.random.key(8), q.shape[:-1])

  def with_lse(fn):
    # out + the lse's contribution (the lse is differentiable too)
    def g(q, k, v, rpb):
      out, lse = fn(q, k, v, kernel, rpb=rpb, return_lse=True, **kw)
      return out + jnp.sum(lse * ct_lse) / out.size
    return g
  f = with_lse(lambda *a, **k: neighborhood_attention(
      *a, implementation=impl, **k))
  r = with_lse(neighborhood_attention_reference)
  assert _has_loop(f, q, k, v, rpb)
  out, g = jit_vjp(f, (q, k, v, rpb), ct, (0, 1, 2, 3))
  ref, gr = jit_vjp(r, (q, k, v, rpb), ct, (0, 1, 2, 3))
  np.testing.assert_allclose(out, ref, atol=2e-6, rtol=2e-6)
  for a, b in zip(g, gr):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_band_loop_bfloat16_and_vmap():
  q, k, v = (x.astype(jnp.bfloat16) for x in _qkv((2, 11, 9, 2, 4)))
  impl = NeighborhoodXLA(tile_size=3, step_bytes=1)
  f = lambda q, k, v: neighborhood_attention(q, k, v, 5, dilation=(2, 1),
                                             implementation=impl)
  f32 = lambda x: x.astype(jnp.float32)
  ref = neighborhood_attention_reference(f32(q), f32(k), f32(v), 5,
                                         dilation=(2, 1))
  out = jax.jit(jax.vmap(f))(q[:, None], k[:, None], v[:, None])[:, 0]
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(f32(out), ref, atol=3e-2, rtol=3e-2)
  g = jax.jit(jax.grad(lambda q: f(q, k, v).astype(jnp.float32).sum()))(q)
  gr = jax.grad(lambda q: neighborhood_attention_reference(
      q, f32(k), f32(v), 5, dilation=(2, 1)).sum())(f32(q))
  assert g.dtype == jnp.bfloat16
  np.testing.assert_allclose(f32(g), gr, atol=6e-2, rtol=6e-2)


def _primitives(jaxpr, acc=None):
  """Names of every primitive in a jaxpr, loop and remat bodies included."""
  acc = set() if acc is None else acc
  for e in jaxpr.eqns:
    acc.add(e.primitive.name)
    for p in e.params.values():
      for sub in (p if isinstance(p, (tuple, list)) else (p,)):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          _primitives(inner, acc)
  return acc


def test_default_backward_has_no_gather_or_scatter():
  """The default path cuts key runs with static slices: its forward+backward
  has no gather and no scatter-add (the all-tiles path gathers the runs and
  its backward scatter-adds into full-size cotangents: fails on it)."""
  x = jax.ShapeDtypeStruct((1, 56, 56, 4, 8), jnp.float32)
  fb = lambda impl: bench_utils.fwd_bwd(lambda q, k, v: neighborhood_attention(
      q, k, v, 7, implementation=impl))
  for impl in (None, NeighborhoodXLA(step_bytes=1)):
    prims = _primitives(jax.make_jaxpr(fb(impl))(x, x, x).jaxpr)
    assert not {"gather", "scatter-add", "scatter_add", "scatter"} & prims
  old = _primitives(jax.make_jaxpr(fb(NeighborhoodXLA(row_loop=False)))(
      x, x, x).jaxpr)
  assert "gather" in old and {"scatter-add", "scatter_add"} & old


@pytest.mark.parametrize("kw", [{}, {"dilation": 2}, {"stride": 4}])
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
def test_default_temp_memory_at_112(mode, kw):
  """Compiled temp memory of the bench's largest calls (112x112, 4 heads x
  32): the all-tiles path needs 86 / 190 MiB (fwd / fwd+bwd), which glibc
  maps fresh on every call (page faults: the exponent's excess); the band
  loop holds one step's logits, and its backward emits each step's own
  key/value rows, the halo rows going on to the next step as a small carry
  (48 / 52 / 48 MiB fwd+bwd for k7 / dilation 2 / stride 4). Per-step
  rows + halo as outputs folded after the loop needed 53 / 65 / 64 MiB
  (and 58 / 76 / 58 with 4x4 tiles): fails on it. Bounds: 32 MiB forward,
  56 MiB fwd+bwd."""
  x = jax.ShapeDtypeStruct((1, 112, 112, 4, 32), jnp.float32)
  fn = lambda q, k, v: neighborhood_attention(q, k, v, 7, **kw)
  if mode == "fwd_bwd":
    fn = bench_utils.fwd_bwd(fn)
  mem = jax.jit(fn).lower(x, x, x).compile().memory_analysis()
  assert mem.temp_size_in_bytes < (32 if mode == "fwd" else 56) * 2 ** 20


# ----------------------------------------------------------------------------
# Band loop tiles and layout (issue 22 item 3, NA7)
# ----------------------------------------------------------------------------

def _dot_shapes(jaxpr, acc=None):
  """Output shapes of every dot_general, loop and custom-VJP bodies
  included."""
  acc = [] if acc is None else acc
  for e in jaxpr.eqns:
    if e.primitive.name == "dot_general":
      acc.append(tuple(e.outvars[0].aval.shape))
    for p in e.params.values():
      for sub in (p if isinstance(p, (tuple, list)) else (p,)):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          _dot_shapes(inner, acc)
  return acc


@pytest.mark.parametrize("kw,logits", [
    (dict(), (16, 100)),            # 4x4 queries, 10x10 keys (7x7: 49, 169)
    (dict(dilation=2), (16, 100)),
    (dict(stride=4), (16, 100)),    # 7x7 tiles straddle stride blocks: 256
])
def test_band_loop_default_tiles_compute_fewer_logits_per_query(kw, logits):
  """On large maps the band loop's default tile is the smallest multiple of
  the stride >= 4 (`_band_tile`): 100 logits per query at K=7 instead of
  the 169 of 7x7 tiles (13x13 key runs); at stride 4 a tile is one stride
  block (one shared window, 3 keys of halo each side for the windows the
  borders shift inward) instead of 7x7 tiles straddling blocks (16x16 runs,
  256 per query). The old loop used 7x7 tiles: fails on it."""
  x = jax.ShapeDtypeStruct((1, 56, 56, 4, 8), jnp.float32)
  fn = lambda q, k, v: neighborhood_attention(q, k, v, 7, **kw)
  assert _has_loop(fn, x, x, x)
  shapes = _dot_shapes(jax.make_jaxpr(fn)(x, x, x).jaxpr)
  # Q K^T per tile: [..., tq, tk]; P V: [..., tq, head_dim + 1]
  assert {s[-2:] for s in shapes if s[-1] != 9} == {logits}


def _top_level_transposes(fn, args, elements):
  """Top-level (outside loops) transposes of arrays of >= `elements`."""
  jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
  return sum(1 for e in jaxpr.eqns if e.primitive.name == "transpose"
             and int(np.prod(e.invars[0].aval.shape)) >= elements)


def test_band_loop_dilation_moves_image_sized_arrays_once():
  """Dilated maps: keys and values enter the loop in image order (padded and
  reshaped, no transpose; the steps' run copies separate the dilation
  groups), queries and the output / lse take one transpose each. XLA:CPU
  needed ~4 ms per 112x112 transpose into group-major order; the old loop
  made 8 (q, k, v and the output / lse into and out of group order, plus
  the tiling): fails on it."""
  x = jax.ShapeDtypeStruct((1, 56, 56, 4, 8), jnp.float32)
  fn = lambda q, k, v: neighborhood_attention(q, k, v, 7, dilation=2,
                                              return_lse=True)
  assert _has_loop(fn, x, x, x)
  assert _top_level_transposes(fn, (x, x, x), 56 * 56 * 4) <= 3
