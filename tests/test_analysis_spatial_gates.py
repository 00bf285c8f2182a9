"""Head gates on the spatial-family layers (attnjax.spatial HeadGated): a
zero gate equals zeroing the head's rows of the output projection, the
importance of a linear loss equals its closed form, and gated_view /
head_importance find spatial layers next to MultiHeadAttention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import analysis as an
from attnjax import spatial as sp
from attnjax.nn import MultiHeadAttention
from attnjax.spatial._common import HeadGated
from tests.strict_modes import strict_mode

D, N = 8, 2


def _random_module(make, seed=0):
  """make() with parameters N(0, 0.5^2) from NumPy (no initializer
  compiles; biases non-zero)."""
  graphdef, state = nnx.split(nnx.eval_shape(make))
  rng = np.random.default_rng(seed)
  state = jax.tree.map(
      lambda a: jnp.asarray(0.5 * rng.standard_normal(a.shape), a.dtype), state)
  return nnx.merge(graphdef, state)


def _x(shape, seed=1):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape),
                     jnp.float32)


R = lambda: nnx.Rngs(0)
X2 = (1, 4, 4, D)
# name -> (constructor, input shape, extra call args)
LAYERS = {
    "window": (lambda: sp.WindowAttention(D, N, 2, shift_size=1, rngs=R()), X2),
    "grid": (lambda: sp.GridAttention(D, N, 2, rngs=R()), X2),
    "neighborhood": (lambda: sp.NeighborhoodAttention(D, N, 3, rngs=R()), X2),
    "twins_lsa": (lambda: sp.LocallyGroupedAttention(D, N, 2, rngs=R()), X2),
    "twins_gsa": (lambda: sp.GlobalSubsampledAttention(D, N, 2, rngs=R()), X2),
    "hilo": (lambda: sp.HiLoAttention(D, N, 2, 0.5, rngs=R()), X2),
    "cswin": (lambda: sp.CSWinAttention(D, N, 2, rngs=R()), X2),
    "biformer": (lambda: sp.BiLevelRoutingAttention(D, N, 2, 2, rngs=R()), X2),
    "channel": (lambda: sp.ChannelAttention(D, N, rngs=R()), X2),
    "gpsa": (lambda: sp.GPSA(D, N, rngs=R()), X2),
    "crossvit": (lambda: sp.CrossViTAttention(D, N, rngs=R()), (1, 5, D)),
    "coat": (lambda: sp.FactorizedAttention(D, N, rngs=R()), X2),
    "crossformer": (lambda: sp.LSDAttention(D, N, 2, rngs=R()), X2),
    "halo": (lambda: sp.HaloAttention(D, N, 2, 1, rngs=R()), X2),
    "hat": (lambda: sp.OverlappingCrossAttention(D, N, 2, overlap_ratio=1.0,
                                                 rngs=R()), X2),
    "sphere": (lambda: sp.SphericalAttention(D, N, rngs=R()), X2),
    "transnext": (lambda: sp.AggregatedAttention(D, N, pool_size=2,
                                                 rngs=R()), X2),
    "window3d": (lambda: sp.WindowAttention3D(D, N, (2, 2, 2), rngs=R()),
                 (1, 2, 4, 4, D)),
    "boat_fsla": (lambda: sp.FeatureSpaceLocalAttention(D, N, 4, 1, rngs=R()),
                  X2),
    "s2aformer": (lambda: sp.StripSelfAttention(D, N, 2, 4, rngs=R()), X2),
    "dcal": (lambda: sp.GlobalLocalCrossAttention(D, N, local_ratio=0.5,
                                                  rngs=R()), (1, 6, D)),
    "ptv3": (lambda: sp.SerializedAttention(D, N, 4, rngs=R()), (1, 6, D)),
}


def _call(name, layer, x):
  if name == "dcal":
    return layer(x, x[..., 0])[0]
  if name == "ptv3":
    return layer(x, jnp.abs(x[..., :3]))
  return layer(x)


def _zeroed_rows(layer, h):
  """A copy whose output projection ignores head h's channels (for a layer
  without one: a function zeroing those output channels)."""
  m = nnx.clone(layer)
  if isinstance(m, sp.HaloAttention):
    d = m.dim // m.num_heads
    return lambda y: y.at[..., h * d:(h + 1) * d].set(0.0)
  if isinstance(m, sp.HiLoAttention):     # Hi-Fi heads first, then Lo-Fi
    proj, i = (m.h_proj, h) if h < m.h_heads else (m.l_proj, h - m.h_heads)
    d = m.head_dim
  else:
    proj, i = (m.wo if hasattr(m, "wo") else m.proj), h
    d = proj.in_features // m.num_heads
  proj.kernel[...] = proj.kernel[...].at[i * d:(i + 1) * d].set(0.0)
  return m


def _without_head(name, layer, x, y, h):
  """The output with head h removed by zeroing projection rows (y: the
  layer's output, used by the layer without a projection)."""
  z = _zeroed_rows(layer, h)
  return _call(name, z, x) if isinstance(z, nnx.Module) else z(y)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_zero_gate_is_zeroed_projection_rows(name):
  make, shape = LAYERS[name]
  layer = _random_module(make)
  assert isinstance(layer, HeadGated) and layer.head_gate is None
  x = _x(shape)

  @jax.jit
  def run(layer, x):
    pruned = _call(name, an.prune_heads(layer, [jnp.array([0.0, 1.0])]), x)
    y = _call(name, layer, x)
    return y, pruned, _without_head(name, layer, x, y, 0)

  y, pruned, zeroed = run(layer, x)
  np.testing.assert_allclose(pruned, zeroed, atol=1e-5)
  assert float(jnp.abs(y - zeroed).max()) > 1e-3      # the head does matter
  assert layer.head_gate is None                      # model untouched


@pytest.mark.parametrize("name", ["window", "hilo", "s2aformer"])
def test_importance_closed_form_linear_loss(name):
  make, shape = LAYERS[name]
  layer = _random_module(make, 3)
  x = _x(shape, 4)
  c = _x(jax.eval_shape(lambda: _call(name, layer, x)).shape, 5)
  loss = lambda model, batch: jnp.sum(_call(name, model, batch[0]) * batch[1])
  with strict_mode("all"):     # the gated path: no rank/dtype promotion, inf
    imp = an.head_importance(layer, loss, [(x, c)], normalize=False)[""]
  # L = sum(c * (sum_h xi_h o_h W_O,h + b)) -> dL/dxi_h = sum(c * o_h W_O,h)
  def contributions(layer, x, c):
    y = _call(name, layer, x)
    return jnp.abs(jnp.stack([jnp.sum(c * (y - _without_head(name, layer, x,
                                                             y, h)))
                              for h in range(N)]))
  want = jax.jit(contributions)(layer, x, c)
  np.testing.assert_allclose(imp, want, rtol=1e-4, atol=1e-5)


class Mixed(nnx.Module):
  def __init__(self, rngs):
    self.axial = sp.AxialAttention(D, N, rngs=rngs)        # two gated axes
    self.win = sp.WindowAttention(D, N, 2, rngs=rngs)
    self.mha = MultiHeadAttention(N, D, head_dim=4, rngs=rngs)

  def __call__(self, x):
    y = self.win(self.axial(x))
    return self.mha(y.reshape(y.shape[0], -1, D))


def test_gated_view_finds_spatial_layers_next_to_mha():
  m = _random_module(lambda: Mixed(nnx.Rngs(0)))
  x = _x(X2, 6)
  view, paths = an.gated_view(m)
  assert paths == ["axial/axes/0", "axial/axes/1", "mha", "win"]
  run = jax.jit(lambda m, x: m(x))
  np.testing.assert_allclose(run(view, x), run(m, x), atol=1e-5)
  imp = an.head_importance(m, lambda mod, b: jnp.mean(mod(b) ** 2), [x])
  assert list(imp) == paths and all(v.shape == (N,) for v in imp.values())
  # pruning every head of the window layer == its output bias only
  gates = {p: jnp.ones(N) for p in paths}
  gates["win"] = jnp.zeros(N)
  pv = an.prune_heads(m, gates)
  want = m.mha(jnp.broadcast_to(m.win.proj.bias[...], (1, 16, D)))
  np.testing.assert_allclose(run(pv, x), want, atol=1e-5)
  with pytest.raises(ValueError, match=r"head_gate.*\(2,\).*\(3,\)"):
    nnx.with_attributes(m.win, head_gate=jnp.ones(3))(x)


def test_atlas_gates_one_per_scale():
  """Atlas MSA: each scale's attention is a gated layer; its gate acts in
  both passes that use the scale's projection, like zeroing its rows."""
  m = _random_module(lambda: sp.MultiScaleAttention(D, N, 2, 4, 2, rngs=R()))
  x = _x((1, 8, 8, D), 7)
  layers = an.gated_layers(m)
  assert [p for p, _ in layers] == ["scales/0", "scales/1"]
  z = nnx.clone(m)
  z.scales[1].proj.kernel[...] = z.scales[1].proj.kernel[...].at[4:].set(0.0)
  run = jax.jit(lambda m, x: jnp.concatenate(
      [y.reshape(-1) for y in m(x)]))
  pruned = an.prune_heads(m, [jnp.ones(N), jnp.array([1.0, 0.0])])
  np.testing.assert_allclose(run(pruned, x), run(z, x), atol=1e-5)
  assert float(jnp.abs(run(pruned, x) - run(m, x)).max()) > 1e-3
