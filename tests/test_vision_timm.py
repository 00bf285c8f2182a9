"""Converted timm checkpoints give timm's logits and per-stage features.

For every model timm has (ViT/DeiT, Swin, DaViT, Twins-SVT, ConViT, SHViT,
CrossViT, MaxViT-TF) a small variant of timm's own architecture is built with
random weights (every parameter and BatchNorm statistic perturbed so that no
zero-initialised tensor hides a mapping error), its state dict is written to
a .safetensors file, loaded with `vision.load_timm`, and the attnjax model's
logits and stage features are compared with timm's on random images
(<= 1e-4 relative to the largest value). The same attnjax presets at full
size are compared in docs/vision.md (runs/.. command there).

Needs torch + timm (the `test` extra); skipped without them.
"""

import numpy as np
import pytest

from attnjax.models import vision

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
safetensors_numpy = pytest.importorskip("safetensors.numpy")
from attnjax.models.vision.check_timm import perturbed_timm_model  # noqa: E402


def _nhwc(t):
  return t.detach().permute(0, 2, 3, 1).numpy()


def _tokens_to_map(t, h, w):
  t = t.detach().numpy()
  return t.reshape(t.shape[0], h, w, t.shape[-1])


def _hooked(tm, modules, x, post=_nhwc):
  """Runs tm(x) and returns (logits, [post(output of each module)])."""
  outs = []
  hs = [m.register_forward_hook(lambda _m, _i, o: outs.append(o))
        for m in modules]
  try:
    logits = tm(x)
  finally:
    for h in hs:
      h.remove()
  return logits.detach().numpy(), [post(o) for o in outs]


def _vit_feats(tm, x, grid):
  f = tm.forward_features(x)
  return tm(x).detach().numpy(), [_tokens_to_map(f[:, 1:], grid, grid)]


def _swin_feats(tm, x):
  logits, outs = _hooked(tm, list(tm.layers), x, post=lambda o: o.detach().numpy())
  outs[-1] = tm.forward_features(x).detach().numpy()     # final norm
  return logits, outs


def _twins_feats(tm, x, sizes):
  logits, outs = _hooked(tm, [b[-1] for b in tm.blocks], x,
                         post=lambda o: o)
  maps = [_tokens_to_map(o, s, s) for o, s in zip(outs, sizes)]
  maps[-1] = _tokens_to_map(tm.forward_features(x), sizes[-1], sizes[-1])
  return logits, maps


def _convit_feats(tm, x, grid):
  f = tm.forward_features(x)
  return tm(x).detach().numpy(), [_tokens_to_map(f[:, 1:], grid, grid)]


def _crossvit_feats(tm, x, grids):
  fs = tm.forward_features(x)
  return tm(x).detach().numpy(), [_tokens_to_map(f[:, 1:], g, g)
                                  for f, g in zip(fs, grids)]


def _stages(tm, x):
  return _hooked(tm, list(tm.stages), x)


# name: (timm architecture, timm kwargs, attnjax model, attnjax kwargs,
#        image size, timm features fn)
CASES = {
    "vit": ("vit_small_patch16_224",
            dict(img_size=32, patch_size=8, embed_dim=48, depth=2,
                 num_heads=3),
            "vit", dict(img_size=32, patch_size=8, embed_dim=48, depth=2,
                        num_heads=3, mlp_ratio=4.0),
            32, lambda tm, x: _vit_feats(tm, x, 4)),
    "swin": ("swin_tiny_patch4_window7_224",
             dict(img_size=56, embed_dim=24, depths=(2, 2), num_heads=(2, 4),
                  window_size=7),
             "swin", dict(img_size=56, patch_size=4, embed_dim=24,
                          depths=(2, 2), num_heads=(2, 4), window_size=7,
                          mlp_ratio=4.0),
             56, _swin_feats),
    "davit": ("davit_tiny",
              dict(embed_dims=(16, 32), depths=(1, 1), num_heads=(1, 2)),
              "davit", dict(dims=(16, 32), depths=(1, 1), num_heads=(1, 2),
                            mlp_ratio=4.0, stem_div=4, window_size=7),
              56, _stages),
    "twins_svt": ("twins_svt_small",
                  dict(embed_dims=(16, 32), depths=(2, 2), num_heads=(1, 2),
                       sr_ratios=(2, 1), wss=(7, 7), mlp_ratios=(4, 4)),
                  "twins_svt", dict(dims=(16, 32), depths=(2, 2),
                                    num_heads=(1, 2), sr_ratios=(2, 1),
                                    window_size=7, mlp_ratio=4.0, stem_div=4),
                  56, lambda tm, x: _twins_feats(tm, x, (14, 7))),
    "convit": ("convit_tiny",
               dict(embed_dim=12, depth=3, num_heads=4, local_up_to_layer=2,
                    img_size=32, patch_size=8),
               "convit", dict(embed_dim=48, depth=3, num_heads=4,
                              local_layers=2, img_size=32, patch_size=8,
                              mlp_ratio=4.0),
               32, lambda tm, x: _convit_feats(tm, x, 4)),
    "shvit": ("shvit_s1",
              dict(embed_dim=(32, 48, 64), partial_dim=(8, 12, 16),
                   depth=(1, 1, 1), types=("i", "s", "s")),
              "shvit", dict(dims=(32, 48, 64), pdims=(8, 12, 16),
                            depths=(1, 1, 1), types=("i", "s", "s"),
                            stem_strides=(2, 2, 2, 2)),
              64, _stages),
    "crossvit": ("crossvit_tiny_240",
                 dict(img_size=60, patch_size=(6, 8), embed_dim=(24, 48),
                      depth=((1, 1, 0), (1, 1, 0)), num_heads=(2, 2)),
                 "crossvit", dict(img_size=60, patch_sizes=(6, 8),
                                  dims=(24, 48), depths=(1, 1),
                                  num_multiscale=2, num_heads=(2, 2),
                                  mlp_ratio=4.0, branch_scale=224 / 240),
                 60, lambda tm, x: _crossvit_feats(tm, x, (10, 7))),
    # stem width == first stage width: stage 0 block 0's shortcut is a pool
    # only (no 1x1 conv), as MaxViT-T; stage 1 has the 1x1 conv.
    "maxvit": ("maxvit_tiny_tf_224",
               dict(img_size=64, embed_dim=(32, 64), depths=(2, 1),
                    stem_width=32, head_hidden_size=64,
                    transformer_window_size=(4, 4),
                    transformer_grid_size=(4, 4), transformer_dim_head=16),
               "maxvit", dict(stem_dim=32, dims=(32, 64), depths=(2, 1),
                              head_dim=16, window_size=4, grid_size=4,
                              mlp_ratio=4.0, stem_stride=2),
               64, _stages),
}

NUM_CLASSES = 7


def _timm_model(arch, kw, seed=0):
  return perturbed_timm_model(arch, seed=seed, scale=0.05,
                              num_classes=NUM_CLASSES, **kw)


def _save(tm, path):
  sd = {k: v.detach().contiguous().numpy() for k, v in tm.state_dict().items()}
  safetensors_numpy.save_file(sd, str(path))
  return sd


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_and_features_match_timm(name, tmp_path):
  arch, tkw, aname, akw, size, feats_fn = CASES[name]
  tm = _timm_model(arch, tkw)
  path = tmp_path / f"{name}.safetensors"
  sd = _save(tm, path)
  model = vision.create_model(aname, "tiny", num_classes=NUM_CLASSES, **akw)
  vision.load_timm(model, path)
  model.eval()
  assert vision.count_params(model) == sum(
      v.size for k, v in sd.items()
      if not k.endswith(("running_mean", "running_var",
                         "num_batches_tracked")))
  x = np.random.default_rng(1).standard_normal(
      (2, size, size, 3)).astype(np.float32)
  with torch.no_grad():
    ref_logits, ref_feats = feats_fn(tm, torch.from_numpy(x).permute(0, 3, 1, 2))
  # logits and features in one compiled program (eager, every op of the
  # model was compiled on its own)
  from flax import nnx
  logits, feats = nnx.jit(lambda m, x: (m(x), m.features(x)))(model, x)
  logits = np.asarray(logits)
  np.testing.assert_array_less(
      np.abs(logits - ref_logits).max(), 1e-4 * np.abs(ref_logits).max())
  feats = [np.asarray(f) for f in feats]
  assert len(feats) == len(ref_feats)
  for i, (f, r) in enumerate(zip(feats, ref_feats)):
    assert f.shape == r.shape, (i, f.shape, r.shape)
    err = np.abs(f - r).max() / np.abs(r).max()
    assert err <= 1e-4, f"{name} stage {i}: relative error {err:.2e}"


def test_attention_maps_of_converted_model(tmp_path):
  """attention_maps works on a converted model and row-sums to one; the
  cls row of the last block equals timm's own attention probabilities."""
  arch, tkw, aname, akw, size, _ = CASES["vit"]
  tm = _timm_model(arch, tkw)
  path = tmp_path / "vit.safetensors"
  _save(tm, path)
  model = vision.load_timm(
      vision.create_model(aname, "tiny", num_classes=NUM_CLASSES, **akw), path)
  x = np.random.default_rng(2).standard_normal((1, size, size, 3)).astype(
      np.float32)
  maps = vision.attention_maps(model, x)
  assert len(maps) == 2
  last = np.asarray(list(maps.values())[-1])
  np.testing.assert_allclose(last.sum(-1), 1.0, atol=1e-5)
  # timm reference: softmax(q k^T / sqrt(d)) of the last block
  captured = {}
  blk = tm.blocks[-1]
  blk.norm1.register_forward_hook(lambda m, i, o: captured.setdefault("h", o))
  with torch.no_grad():
    tm(torch.from_numpy(x).permute(0, 3, 1, 2))
    h = captured["h"]
    b, n, c = h.shape
    nh = blk.attn.num_heads
    qkv = blk.attn.qkv(h).reshape(b, n, 3, nh, c // nh).permute(2, 0, 3, 1, 4)
    ref = torch.softmax(qkv[0] @ qkv[1].transpose(-1, -2) * (c // nh) ** -0.5,
                        -1).numpy()
  np.testing.assert_allclose(last, ref, atol=1e-5)


def test_mismatch_names_keys_and_shapes(tmp_path):
  arch, tkw, aname, akw, _, _ = CASES["swin"]
  tm = _timm_model(arch, tkw)
  path = tmp_path / "swin.safetensors"
  sd = _save(tm, path)
  # a Swin checkpoint into a ViT: missing and unexpected keys
  vit = vision.create_model("vit", "tiny")
  with pytest.raises(vision.CheckpointMismatchError) as e:
    vision.load_timm(vit, path)
  msg = str(e.value)
  assert "missing keys" in msg and "blocks.0.attn.qkv.weight" in msg
  assert "unexpected keys" in msg and "layers.0.blocks.0.attn.qkv.weight" in msg
  # right architecture, wrong number of classes: the head shapes are named
  swin10 = vision.create_model(aname, "tiny", num_classes=10, **akw)
  before = np.asarray(swin10.head.fc.kernel[...]).copy()
  with pytest.raises(vision.CheckpointMismatchError) as e:
    vision.load_timm(swin10, path)
  assert "head.fc.weight (7, 48) -> head/fc/kernel (48, 10)" in str(e.value)
  # nothing was written on failure
  np.testing.assert_array_equal(np.asarray(swin10.head.fc.kernel[...]), before)
  # skip the head: loads everything else
  vision.load_timm(swin10, path, skip=("head",))
  np.testing.assert_array_equal(np.asarray(swin10.head.fc.kernel[...]), before)
  np.testing.assert_array_equal(
      np.asarray(swin10.patch_embed.kernel[...]),
      sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0))
  # a truncated checkpoint: the absent tensor is named
  del sd["layers.1.blocks.1.mlp.fc2.bias"]
  with pytest.raises(vision.CheckpointMismatchError,
                     match=r"layers\.1\.blocks\.1\.mlp\.fc2\.bias"):
    vision.load_timm(vision.create_model(aname, "tiny",
                                         num_classes=NUM_CLASSES, **akw), sd)


def test_vision_classify_init_from(tmp_path):
  """--config.init_from=PATH: the backbone starts from the converted timm
  checkpoint (head skipped: fresh init), then fine-tuning runs."""
  from experiments import vision_classify as vc
  from experiments.configs import vision_classify as vc_config
  kw = vision.model_kwargs("vit", "tiny")
  tm = _timm_model("vit_small_patch16_224", dict(
      img_size=32, patch_size=kw["patch_size"], embed_dim=kw["embed_dim"],
      depth=kw["depth"], num_heads=kw["num_heads"],
      mlp_ratio=kw["mlp_ratio"], in_chans=1))
  path = tmp_path / "vit_tiny.safetensors"
  sd = _save(tm, path)               # 7 classes; the digits task has 10
  cfg = vc_config.get_config("vit,smoke")
  cfg.init_from = str(path)
  cfg.steps, cfg.eval_every, cfg.ckpt_every, cfg.batch_size = 2, 2, 2, 8
  model, _, _ = vc.build(cfg)
  np.testing.assert_array_equal(
      np.asarray(model.blocks_[1].mlp.fc1.kernel[...]),
      sd["blocks.1.mlp.fc1.weight"].T)
  fresh, _, _ = vc.build(vc_config.get_config("vit,smoke"))
  np.testing.assert_array_equal(np.asarray(model.head.fc.kernel[...]),
                                np.asarray(fresh.head.fc.kernel[...]))
  res = vc.train(cfg, str(tmp_path / "ft"))
  assert res["params"] == vision.count_params(model)
  assert np.isfinite(res["final_train_loss"])
  # a checkpoint of another architecture is refused with the key names
  cfg.init_from = str(path)
  cfg.model = "convit"
  with pytest.raises(vision.CheckpointMismatchError, match="blocks.0.attn"):
    vc.build(cfg)
