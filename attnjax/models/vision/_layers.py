"""Building blocks shared by the vision backbones (channels-last everywhere).

Nothing here computes attention: the token mixers are the layers of
`attnjax.nn`, `attnjax.spatial` and `attnjax.sequence`, wrapped in the pre-norm
residual `Block`. A `Block` built (or viewed, `nnx.with_attributes`) with
`record=True` sows its mixer's attention map, computed by
`attention_maps.layer_map`; `attention_maps.attention_maps` does this on a
view of the model, never on the model itself.
"""

from __future__ import annotations

import functools
from typing import Callable, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnjax.nn import MLP

trunc02 = nnx.initializers.truncated_normal(0.02)

# PyTorch's nn.GELU() is the exact (erf) GELU; flax's `nnx.gelu` defaults to
# the tanh approximation (= nn.GELU(approximate='tanh')). The official ViT,
# DeiT, Swin, NAT, DaViT, CSWin, Twins, BiFormer, ConViT, CrossViT, LITv2,
# Agent and MoH models use the exact one; MaxViT's TF weights use tanh.
gelu_exact = functools.partial(jax.nn.gelu, approximate=False)
gelu_tanh = functools.partial(jax.nn.gelu, approximate=True)

# torch.nn.LayerNorm's default epsilon (flax's default is 1e-6).
TORCH_LN_EPS = 1e-5


def pair(x):
  return (x, x) if isinstance(x, int) else tuple(x)


class Block(nnx.Module):
  """Pre-norm residual block: x + mixer(norm1(x)); x + MLP(norm2(x)).

  Works on tokens [B, T, C] or maps [B, H, W, C] (whatever `mixer` takes).
  `mlp_ratio=0` drops the MLP. With `record=True` (a static option, set at
  construction or on a view) the block sows the mixer's attention map as
  `nnx.Intermediate` "attention_map" and its input (the residual stream
  entering the mixer) as "block_input" (collect them with `nnx.capture`).
  """

  def __init__(self, dim: int, mixer: nnx.Module, *, mlp_ratio: float = 4.0,
               activation: Callable = gelu_exact, norm_eps: float = 1e-5,
               pos_conv: int = 0, pos_conv_mlp: int = 0,
               mlp: Optional[nnx.Module] = None, record: bool = False,
               rngs: nnx.Rngs):
    # pos_conv=k: x + dwconv_k(x) before the mixer (DaViT CPE, BiFormer);
    # pos_conv_mlp=k: the same before the MLP (DaViT). Maps only.
    self.cpe = (conv(dim, dim, pos_conv, groups=dim, rngs=rngs)
                if pos_conv else None)
    self.cpe_mlp = (conv(dim, dim, pos_conv_mlp, groups=dim, rngs=rngs)
                    if pos_conv_mlp else None)
    # mixer=None: an MLP-only block (LITv2's early stages).
    self.norm1 = (nnx.LayerNorm(dim, epsilon=norm_eps, rngs=rngs)
                  if mixer is not None else None)
    self.attn = mixer
    hidden = int(dim * mlp_ratio)
    if hidden > 0 or mlp is not None:
      self.norm2 = nnx.LayerNorm(dim, epsilon=norm_eps, rngs=rngs)
      self.mlp = mlp if mlp is not None else MLP(
          dim, hidden, activation=activation, rngs=rngs)
    else:
      self.norm2 = None
      self.mlp = None
    self.record = record

  def mix(self, h, **mixer_kw):
    return self.attn(h, **mixer_kw)

  def __call__(self, x, **mixer_kw):
    # mixer_kw: static extras for the mixer (e.g. the token grid of
    # agent.AgentDeiTAttention); empty for every other mixer.
    if self.cpe is not None:
      x = x + self.cpe(x)
    if self.attn is not None:
      if self.record:     # the residual stream entering the mixer
        self.sow(nnx.Intermediate, "block_input", x)
      h = self.norm1(x)
      if self.record:
        from attnjax.models.vision.attention_maps import layer_map
        self.sow(nnx.Intermediate, "attention_map",
                 layer_map(self.attn, h, **mixer_kw))
      x = x + self.mix(h, **mixer_kw)
    if self.cpe_mlp is not None:
      x = x + self.cpe_mlp(x)
    if self.mlp is not None:
      x = x + self.mlp(self.norm2(x))
    return x


class ConvMLP(nnx.Module):
  """fc1 -> 3x3 depth-wise conv -> exact GELU -> fc2 on maps (LITv2's FFN)."""

  def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(dim, hidden, rngs=rngs)
    self.dw = conv(hidden, hidden, 3, groups=hidden, rngs=rngs)
    self.fc2 = nnx.Linear(hidden, dim, rngs=rngs)

  def __call__(self, x):
    return self.fc2(gelu_exact(self.dw(self.fc1(x))))


class ConvBN(nnx.Module):
  """Conv (no bias) + BatchNorm, channels-last; `groups` for depth-wise."""

  def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, *,
               groups: int = 1, padding=None, bn_scale_init: float = 1.0,
               use_bias: bool = False, rngs: nnx.Rngs):
    pad = kernel // 2 if padding is None else padding
    self.conv = nnx.Conv(cin, cout, (kernel, kernel), (stride, stride),
                         padding=[(pad, pad), (pad, pad)],
                         feature_group_count=groups, use_bias=use_bias,
                         rngs=rngs)
    self.bn = nnx.BatchNorm(cout, momentum=0.9, rngs=rngs,
                            scale_init=nnx.initializers.constant(bn_scale_init))

  def __call__(self, x):
    return self.bn(self.conv(x))


def conv(cin, cout, kernel, stride=1, *, groups=1, use_bias=True, rngs):
  """Conv with PyTorch-style symmetric padding kernel // 2."""
  p = kernel // 2
  return nnx.Conv(cin, cout, (kernel, kernel), (stride, stride),
                  padding=[(p, p), (p, p)], feature_group_count=groups,
                  use_bias=use_bias, rngs=rngs)


class SqueezeExcite(nnx.Module):
  """SE: global mean -> 1x1 reduce (bias) -> act -> 1x1 expand (bias) -> sigmoid gate."""

  def __init__(self, dim: int, rd: int, *, activation=nnx.relu,
               rngs: nnx.Rngs):
    self.reduce = nnx.Linear(dim, rd, rngs=rngs)
    self.expand = nnx.Linear(rd, dim, rngs=rngs)
    self.activation = activation

  def __call__(self, x):
    s = jnp.mean(x, axis=(1, 2), keepdims=True)
    return x * nnx.sigmoid(self.expand(self.activation(self.reduce(s))))


def resize_pos_embed(pos, grid_from, grid_to, method="bicubic"):
  """[..., gh*gw, C] grid position embedding resized to a new grid."""
  if tuple(grid_from) == tuple(grid_to):
    return pos
  c = pos.shape[-1]
  lead = pos.shape[:-2]
  g = pos.reshape(*lead, *grid_from, c)
  g = jax.image.resize(g.astype(jnp.float32), (*lead, *grid_to, c), method)
  return g.reshape(*lead, grid_to[0] * grid_to[1], c).astype(pos.dtype)


def pad_to_multiple(x, m: int):
  """Zero-pads H and W of [B, H, W, C] at the end to multiples of m."""
  h, w = x.shape[1:3]
  ph, pw = (-h) % m, (-w) % m
  if ph or pw:
    x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
  return x


class ClassifierHead(nnx.Module):
  """Global average pool (maps) or pooled/cls token -> [norm] -> Linear."""

  def __init__(self, dim: int, num_classes: int, *, norm: bool = False,
               norm_eps: float = TORCH_LN_EPS, rngs: nnx.Rngs):
    self.norm = (nnx.LayerNorm(dim, epsilon=norm_eps, rngs=rngs) if norm
                 else None)
    self.fc = nnx.Linear(dim, num_classes, rngs=rngs) if num_classes > 0 else None

  def __call__(self, x):
    if x.ndim == 4:
      x = jnp.mean(x, axis=(1, 2))
    if self.norm is not None:
      x = self.norm(x)
    return x if self.fc is None else self.fc(x)


class Backbone(nnx.Module):
  """Common interface of every model in attnjax.models.vision.

  Subclasses implement `features(x) -> list of [B, H_i, W_i, C_i]` (one per
  stage, multi-scale for hierarchical models) and `forward_features(x)`
  (the final representation fed to the head: a map [B, h, w, C] or pooled
  [B, C]); `__call__(x)` returns logits [B, num_classes]. Inputs are
  channels-last images [B, H, W, in_chans].
  """

  num_classes: int
  stage_channels: Sequence[int]

  def forward_head(self, feats):
    return self.head(feats)

  def __call__(self, x):
    return self.forward_head(self.forward_features(x))

  def blocks(self) -> List[Block]:
    """All attention-carrying `Block`s in forward order."""
    out = []
    for _, m in nnx.iter_graph(self):
      if isinstance(m, Block) and m.attn is not None:
        out.append(m)
    return out


def _torch_cubic_matrix(n_in: int, n_out: int, a: float = -0.75) -> np.ndarray:
  """[n_out, n_in] weights of PyTorch's bicubic interpolation along one axis
  (align_corners=False, Keys kernel with a = -0.75, border-replicated
  taps, no antialiasing; positions and weights in float32 as PyTorch)."""
  f = np.float32
  scale = f(n_in) / f(n_out)
  src = (np.arange(n_out, dtype=f) + f(0.5)) * scale - f(0.5)
  i0 = np.floor(src).astype(np.int64)
  t = (src - i0).astype(f)
  def k_near(x):          # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1
  def k_far(x):           # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  w = np.stack([k_far(t + 1), k_near(t), k_near(1 - t), k_far(2 - t)],
               -1).astype(f)
  m = np.zeros((n_out, n_in), np.float64)
  for j in range(4):
    idx = np.clip(i0 - 1 + j, 0, n_in - 1)
    np.add.at(m, (np.arange(n_out), idx), w[:, j])
  return m


def torch_bicubic_resize(x, size):
  """[B, H, W, C] resized to `size` (h, w) exactly as
  torch.nn.functional.interpolate(mode='bicubic', align_corners=False)
  (what CrossViT uses to feed its second branch). `jax.image.resize`
  differs: Keys a = -0.5 and antialiasing when downsampling."""
  h, w = x.shape[1:3]
  if (h, w) == tuple(size):
    return x
  mh = jnp.asarray(_torch_cubic_matrix(h, size[0]), jnp.float32)
  mw = jnp.asarray(_torch_cubic_matrix(w, size[1]), jnp.float32)
  y = jnp.einsum("oh,bhwc->bowc", mh, x.astype(jnp.float32),
                 precision=jax.lax.Precision.HIGHEST)
  y = jnp.einsum("pw,bowc->bopc", mw, y, precision=jax.lax.Precision.HIGHEST)
  return y.astype(x.dtype)


def stage_features(x, stages, downs, norm=None, pegs=None):
  """The hierarchical backbones' `features` loop: each stage's blocks, the
  feature map after every stage (the last one through `norm` when given),
  then the stage's downsampling (`downs[i]`, None for none). `pegs[i]`, when
  given and not None, is a positional-encoding generator added after the
  stage's first block (Twins)."""
  feats = []
  for i, stage in enumerate(stages):
    for j, blk in enumerate(stage):
      x = blk(x)
      if j == 0 and pegs is not None and pegs[i] is not None:
        x = x + pegs[i](x)
    last = i == len(stages) - 1
    feats.append(norm(x) if last and norm is not None else x)
    if downs[i] is not None:
      x = downs[i](x)
  return feats

