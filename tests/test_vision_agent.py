"""Agent-DeiT (official layer): published size, and a state dict in the
official layout (LeapLabTHU/Agent-Attention agent_deit.py, timm ViT names)
loads and reproduces the official forward, written here in torch from the
paper's equations / the official module's forward (bilinear bias resize,
adaptive pooling of the queries, two biased softmaxes, depth-wise conv on
the values)."""

import numpy as np
import pytest

from attnjax.models import vision

torch = pytest.importorskip("torch")
F = torch.nn.functional


def test_agent_deit_t_published_size():
  ctor = vision.model_ctor("agent_deit", "t", num_classes=1000)
  params = vision.count_params(ctor)
  # Agent-DeiT-T: 6.0M parameters, 1.2G FLOPs (official model table)
  assert abs(params / 6.0e6 - 1) <= 0.03, params
  # = DeiT-T + per block: dwc (9C + C), an/na (2 N A 7 7), ah/aw/ha/wa
  # (4 N A 14), ac/ca (2 N A)
  c, n, a, w = 192, 3, 49, 14
  deit_t = vision.count_params(vision.model_ctor(
      "vit", "s16", embed_dim=192, num_heads=3, num_classes=1000))
  assert params == deit_t + 12 * (10 * c + 2 * n * a * 49 + 4 * n * a * w
                                  + 2 * n * a)


def _official_attention(sd, p, x, heads, agent_num, window):
  """The official AgentAttention.forward, in torch, from state-dict tensors."""
  t = lambda k: torch.from_numpy(sd[f"{p}.{k}"]).double()
  b, n, c = x.shape
  hd = c // heads
  scale = hd ** -0.5
  qkv = (x @ t("qkv.weight").T + t("qkv.bias")).reshape(b, n, 3, c)
  q, k, v = qkv.unbind(2)
  pool = int(agent_num ** 0.5)
  agents = F.adaptive_avg_pool2d(
      q[:, 1:].reshape(b, window, window, c).permute(0, 3, 1, 2), pool)
  agents = agents.reshape(b, c, -1).permute(0, 2, 1)
  split = lambda z: z.reshape(b, -1, heads, hd).permute(0, 2, 1, 3)
  q, k, v, agents = split(q), split(k), split(v), split(agents)
  pb1 = F.interpolate(t("an_bias"), size=(window, window), mode="bilinear")
  pb = pb1.reshape(1, heads, agent_num, -1) + (
      t("ah_bias") + t("aw_bias")).reshape(1, heads, agent_num, -1)
  pb = torch.cat([t("ac_bias"), pb], -1)
  agent_v = torch.softmax(agents * scale @ k.transpose(-2, -1) + pb, -1) @ v
  ab1 = F.interpolate(t("na_bias"), size=(window, window), mode="bilinear")
  ab = ab1.reshape(1, heads, agent_num, -1).permute(0, 1, 3, 2) + (
      t("ha_bias") + t("wa_bias")).reshape(1, heads, -1, agent_num)
  ab = torch.cat([t("ca_bias"), ab], -2)
  out = torch.softmax(q * scale @ agents.transpose(-2, -1) + ab, -1) @ agent_v
  out = out.transpose(1, 2).reshape(b, n, c)
  v_ = v[:, :, 1:].transpose(1, 2).reshape(b, window, window, c).permute(
      0, 3, 1, 2)
  dwc = F.conv2d(v_, t("dwc.weight"), t("dwc.bias"), padding=1, groups=c)
  out[:, 1:] = out[:, 1:] + dwc.permute(0, 2, 3, 1).reshape(b, n - 1, c)
  return out @ t("proj.weight").T + t("proj.bias")


def _official_forward(sd, x, depth, heads, agent_num, window, patch):
  t = lambda k: torch.from_numpy(sd[k]).double()
  ln = lambda z, k: F.layer_norm(z, z.shape[-1:], t(f"{k}.weight"),
                                 t(f"{k}.bias"), eps=1e-6)
  z = F.conv2d(x, t("patch_embed.proj.weight"), t("patch_embed.proj.bias"),
               stride=patch).flatten(2).transpose(1, 2)
  z = torch.cat([t("cls_token").expand(z.shape[0], -1, -1), z], 1)
  z = z + t("pos_embed")
  for i in range(depth):
    p = f"blocks.{i}"
    z = z + _official_attention(sd, f"{p}.attn", ln(z, f"{p}.norm1"), heads,
                                agent_num, window)
    h = ln(z, f"{p}.norm2") @ t(f"{p}.mlp.fc1.weight").T + t(f"{p}.mlp.fc1.bias")
    z = z + F.gelu(h) @ t(f"{p}.mlp.fc2.weight").T + t(f"{p}.mlp.fc2.bias")
  z = ln(z, "norm")
  return z[:, 0] @ t("head.weight").T + t("head.bias")


def test_official_state_dict_matches_official_forward(tmp_path):
  kw = dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2,
            num_agents=16, mlp_ratio=2.0, num_classes=5)
  model = vision.create_model("agent_deit", "tiny", **kw)
  # a random state dict in the official layout: shapes from the model's
  # own parameters mapped back to torch conventions
  rng = np.random.default_rng(0)
  c, nh, a, w = 32, 2, 16, 8
  shapes = {"patch_embed.proj.weight": (c, 3, 4, 4), "patch_embed.proj.bias": (c,),
            "cls_token": (1, 1, c), "pos_embed": (1, 1 + w * w, c),
            "norm.weight": (c,), "norm.bias": (c,), "head.weight": (5, c),
            "head.bias": (5,)}
  for i in range(2):
    p = f"blocks.{i}"
    shapes.update({
        f"{p}.norm1.weight": (c,), f"{p}.norm1.bias": (c,),
        f"{p}.norm2.weight": (c,), f"{p}.norm2.bias": (c,),
        f"{p}.mlp.fc1.weight": (2 * c, c), f"{p}.mlp.fc1.bias": (2 * c,),
        f"{p}.mlp.fc2.weight": (c, 2 * c), f"{p}.mlp.fc2.bias": (c,),
        f"{p}.attn.qkv.weight": (3 * c, c), f"{p}.attn.qkv.bias": (3 * c,),
        f"{p}.attn.proj.weight": (c, c), f"{p}.attn.proj.bias": (c,),
        f"{p}.attn.dwc.weight": (c, 1, 3, 3), f"{p}.attn.dwc.bias": (c,),
        f"{p}.attn.an_bias": (nh, a, 7, 7), f"{p}.attn.na_bias": (nh, a, 7, 7),
        f"{p}.attn.ah_bias": (1, nh, a, w, 1),
        f"{p}.attn.aw_bias": (1, nh, a, 1, w),
        f"{p}.attn.ha_bias": (1, nh, w, 1, a),
        f"{p}.attn.wa_bias": (1, nh, 1, w, a),
        f"{p}.attn.ac_bias": (1, nh, a, 1), f"{p}.attn.ca_bias": (1, nh, 1, a)})
  sd = {k: (0.2 * rng.standard_normal(s)).astype(np.float32)
        for k, s in shapes.items()}
  for k in sd:
    if k.endswith(("norm1.weight", "norm2.weight", "norm.weight")):
      sd[k] = sd[k] + 1.0
  vision.load_timm(model, sd)
  x = rng.standard_normal((2, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    ref = _official_forward(sd, torch.from_numpy(x).double().permute(0, 3, 1, 2),
                            2, nh, a, w, 4).numpy()
  # forward and attention maps in one compiled program (eager, every op of
  # the model was compiled on its own)
  from flax import nnx
  out, maps = nnx.jit(lambda m, x: (m(x), vision.attention_maps(m, x[:1])))(
      model, x)
  out = np.asarray(out)
  assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max(), np.abs(out - ref).max()
  # attention maps of the converted model are row-stochastic
  assert len(maps) == 2
  for m in maps.values():
    np.testing.assert_allclose(np.asarray(m).sum(-1), 1.0, atol=1e-5)
