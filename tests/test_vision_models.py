"""Vision backbones: every tiny preset jits forward + backward on CPU, takes
odd input sizes, returns multi-scale features, and yields attention maps."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from attnjax.models import vision as V

MODELS = V.model_names()


def _loss(model, x, y):
  logits = model(x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@pytest.mark.parametrize("name", MODELS)
def test_tiny_forward_backward_jit(name):
  model = V.create_model(name, "tiny", in_chans=1, seed=0)
  model.train()
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 1))
  y = jnp.array([1, 3])

  @nnx.jit
  def step(model, x, y):
    return nnx.value_and_grad(_loss)(model, x, y)

  loss, grads = step(model, x, y)
  assert np.isfinite(float(loss))
  leaves = jax.tree_util.tree_leaves(grads)
  assert leaves and all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
  # gradients reach most parameters (zero-initialised BN scales, e.g. in
  # SHViT, legitimately block some at initialisation) and the head
  assert sum(float(jnp.abs(g).sum()) > 0 for g in leaves) > 0.5 * len(leaves)

  model.eval()
  # an input size no window / patch divides; features are multi-scale maps
  x2 = jax.random.normal(jax.random.key(1), (1, 27, 30, 1))
  # logits and features in one compiled program (eager features compiled
  # every op of the model on its own)
  out, feats = nnx.jit(lambda m, x: (m(x), m.features(x)))(model, x2)
  assert out.shape == (1, 10) and bool(jnp.all(jnp.isfinite(out)))
  assert len(feats) == len(model.stage_channels)
  for f, c in zip(feats, model.stage_channels):
    assert f.ndim == 4 and f.shape[-1] == c
  sizes = [f.shape[1] for f in feats]
  assert sizes == sorted(sizes, reverse=True)


@pytest.mark.parametrize("name", MODELS)
def test_attention_maps_are_distributions(name):
  model = V.create_model(name, "tiny", in_chans=1, seed=0)
  model.eval()
  x = jax.random.normal(jax.random.key(2), (1, 16, 16, 1))   # small: cheap
  # one compiled program (eager, each op of the recording view was compiled
  # on its own); state the recording left behind would come back to `model`
  # from nnx.jit as well, so the check below still catches it
  maps = nnx.jit(V.attention_maps)(model, x)
  assert len(maps) == len(model.blocks()) > 0
  for k, m in maps.items():
    assert m.ndim == 4, k
    rows = np.asarray(m.sum(-1))
    assert np.all(np.asarray(m) >= -1e-6)
    if name == "moh_vit":   # head maps weighted by the per-token head gates
      assert np.all(rows <= 1 + 1e-4) and np.all(rows.sum(1) > 0)
    else:
      np.testing.assert_allclose(rows, 1.0, atol=1e-4)
  # recording leaves no state behind and does not change the output
  assert not jax.tree_util.tree_leaves(nnx.state(model, nnx.Intermediate))


def test_vit_map_matches_attention_weights():
  """The probe extractor and the layer's sow_weights agree (MHA)."""
  from attnjax.models.vision.attention_maps import _probe, _probe_to_map
  model = V.create_model("vit", "tiny", in_chans=1)
  blk = model.blocks()[0]
  h = jax.random.normal(jax.random.key(3), (1, 65, 64))
  sow = V.layer_map(blk.attn, h)
  q, k, _ = blk.attn.project_qkv(h)
  probe = _probe_to_map(blk.attn.attention_fn(q, k, _probe((65,), 1, 4)), (65,))
  np.testing.assert_allclose(np.asarray(sow), np.asarray(probe), atol=1e-5)


def test_window_map_is_block_diagonal():
  """Swin's first block (no shift) attends only within 4x4 windows."""
  model = V.create_model("swin", "tiny", in_chans=1)
  m = nnx.jit(V.attention_maps)(model, jnp.ones((1, 32, 32, 1)))["stages/0/0"]
  yy, xx = np.divmod(np.arange(256), 16)
  win = (yy // 4) * 4 + xx // 4
  outside = np.asarray(m[0, 0])[win[:, None] != win[None, :]]
  assert np.abs(outside).max() == 0.0


def test_vit_position_embedding_resizes():
  model = V.create_model("vit", "tiny", in_chans=1)
  pos = model.pos_embed[...]
  from attnjax.models.vision._layers import resize_pos_embed
  same = resize_pos_embed(pos[:, 1:], (8, 8), (8, 8))
  np.testing.assert_array_equal(np.asarray(same), np.asarray(pos[:, 1:]))
  big = resize_pos_embed(pos[:, 1:], (8, 8), (12, 10))
  assert big.shape == (1, 120, 64)
  out = nnx.jit(lambda m, x: m(x))(model, jnp.ones((1, 48, 40, 1)))
  assert out.shape == (1, 10)


def test_swin_window_resize():
  model = V.create_model("swin", "tiny", in_chans=1)
  model.set_window_size(6)
  attn = model.blocks()[1].attn
  assert attn.window_size == (6, 6) and attn.shift_size == (3, 3)
  assert attn.relative_position_bias_table.shape == (121, 2)
  assert nnx.jit(lambda m, x: m(x))(model, jnp.ones((1, 32, 32, 1))).shape == (1, 10)
