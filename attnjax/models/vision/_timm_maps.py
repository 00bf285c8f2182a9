"""timm state-dict name/layout maps, one function per architecture.

Each `_map_<arch>(m, model)` walks the attnjax model and, for every
parameter, takes the timm tensor that holds it (`m.linear`, `m.conv`,
`m.ln`, `m.bn`, `m.mha`, `m.raw` in `convert._Mapper`). Written from timm
1.0's module names (vision_transformer, swin_transformer, davit, twins,
convit, shvit, crossvit, maxxvit).
"""

from __future__ import annotations

import numpy as np

from attnjax.nn import MultiHeadAttention


def converter_for(model):
  from attnjax.models.vision import (convit, crossvit, hierarchical, maxvit,
                                     shvit, swin, vit)
  if isinstance(model, vit.ViT):
    if model.mixer_kind not in ("softmax", "agent_deit"):
      raise ValueError(
          f"no checkpoint layout for a ViT with mixer {model.mixer_kind!r} "
          "(timm ViT/DeiT: 'softmax'; official Agent-DeiT: 'agent_deit').")
    return _map_vit
  if isinstance(model, swin.Swin):
    return _map_swin
  if isinstance(model, hierarchical.Hierarchical):
    if model.family == "davit":
      return _map_davit
    if model.family == "twins":
      return _map_twins
    raise ValueError(f"timm has no {model.family!r} model.")
  if isinstance(model, convit.ConViT):
    return _map_convit
  if isinstance(model, shvit.SHViT):
    return _map_shvit
  if isinstance(model, crossvit.CrossViT):
    return _map_crossvit
  if isinstance(model, maxvit.MaxViT):
    return _map_maxvit
  raise ValueError(f"no timm converter for {type(model).__name__}.")


def _block(m, dst, src, blk):
  """Pre-norm Block: norm1, attn, norm2, mlp (attn mapped by the caller
  unless it is a MultiHeadAttention)."""
  m.ln(f"{dst}/norm1", f"{src}.norm1")
  m.ln(f"{dst}/norm2", f"{src}.norm2")
  m.mlp(f"{dst}/mlp", f"{src}.mlp")
  if isinstance(blk.attn, MultiHeadAttention):
    m.mha(f"{dst}/attn", f"{src}.attn", blk.attn.num_heads)


def _head(m, dst, src, model):
  if model.num_classes > 0:
    m.linear(dst, src)


# -- ViT / DeiT (vision_transformer.py) ---------------------------------------
def _map_vit(m, model):
  m.conv("patch_embed", "patch_embed.proj")
  m.raw("cls_token", "cls_token")
  m.raw("pos_embed", "pos_embed")
  for i, blk in enumerate(model.blocks_):
    d, s = f"blocks_/{i}", f"blocks.{i}"
    _block(m, d, s, blk)
    if not isinstance(blk.attn, MultiHeadAttention):   # official Agent-DeiT
      m.linear(f"{d}/attn/qkv", f"{s}.attn.qkv")
      m.linear(f"{d}/attn/proj", f"{s}.attn.proj")
      m.conv(f"{d}/attn/dwc", f"{s}.attn.dwc")
      for b in ("an", "na", "ah", "aw", "ha", "wa", "ac", "ca"):
        m.raw(f"{d}/attn/{b}_bias", f"{s}.attn.{b}_bias")
  m.ln("norm", "norm")
  _head(m, "head/fc", "head", model)


# -- Swin (swin_transformer.py) -----------------------------------------------
def _map_swin(m, model):
  m.conv("patch_embed", "patch_embed.proj")
  m.ln("patch_norm", "patch_embed.norm")
  for i, stage in enumerate(model.stages):
    for j, blk in enumerate(stage):
      d, s = f"stages/{i}/{j}", f"layers.{i}.blocks.{j}"
      _block(m, d, s, blk)
      m.linear(f"{d}/attn/qkv", f"{s}.attn.qkv")
      m.linear(f"{d}/attn/proj", f"{s}.attn.proj")
      m.raw(f"{d}/attn/relative_position_bias_table",
            f"{s}.attn.relative_position_bias_table")
    if model.merges[i] is not None:
      s = f"layers.{i + 1}.downsample"
      m.ln(f"merges/{i}/norm", f"{s}.norm")
      m.linear(f"merges/{i}/reduction", f"{s}.reduction", bias=False)
  m.ln("norm", "norm")
  _head(m, "head/fc", "head.fc", model)


def _fused_qkv(m, dst, src, order=(0, 1, 2), bias=True):
  """Fused qkv Linear(d, 3d), chunks reordered: attnjax chunk i = timm
  chunk order[i]."""
  def perm(a):
    parts = np.split(a, 3, axis=0)
    return np.concatenate([parts[o] for o in order], axis=0)
  m.raw(f"{dst}/kernel", f"{src}.weight", lambda w: perm(w).T)
  if bias:
    m.raw(f"{dst}/bias", f"{src}.bias", perm)


# -- DaViT (davit.py) ----------------------------------------------------------
# timm's ChannelAttention computes softmax(k^T v) applied to q; attnjax's
# channel_attention computes softmax(q^T k) applied to v, so the attnjax
# (q, k, v) chunks are timm's (k, v, q).
_DAVIT_CHANNEL_ORDER = (1, 2, 0)


def _map_davit(m, model):
  m.conv("stem/conv", "stem.conv")
  m.ln("stem/post", "stem.norm")
  for i, stage in enumerate(model.stages):
    if i > 0:
      m.ln(f"downs/{i - 1}/pre", f"stages.{i}.downsample.norm")
      m.conv(f"downs/{i - 1}/conv", f"stages.{i}.downsample.conv")
    for j, blk in enumerate(stage):
      d, s = f"stages/{i}/{j}", f"stages.{i}.blocks.{j // 2}.{j % 2}"
      _block(m, d, s, blk)
      m.conv(f"{d}/cpe", f"{s}.cpe1.proj")
      m.conv(f"{d}/cpe_mlp", f"{s}.cpe2.proj")
      _fused_qkv(m, f"{d}/attn/qkv", f"{s}.attn.qkv",
                 order=(0, 1, 2) if j % 2 == 0 else _DAVIT_CHANNEL_ORDER)
      m.linear(f"{d}/attn/proj", f"{s}.attn.proj")
  m.ln("head/norm", "head.norm")
  _head(m, "head/fc", "head.fc", model)


# -- Twins-SVT (twins.py) --------------------------------------------------------
def _map_twins(m, model):
  m.conv("stem/conv", "patch_embeds.0.proj")
  m.ln("stem/post", "patch_embeds.0.norm")
  for i, stage in enumerate(model.stages):
    if i > 0:
      m.conv(f"downs/{i - 1}/conv", f"patch_embeds.{i}.proj")
      m.ln(f"downs/{i - 1}/post", f"patch_embeds.{i}.norm")
    m.conv(f"pegs/{i}", f"pos_block.{i}.proj.0")
    for j, blk in enumerate(stage):
      d, s = f"stages/{i}/{j}", f"blocks.{i}.{j}"
      _block(m, d, s, blk)
      if hasattr(blk.attn, "qkv"):                   # LSA
        m.linear(f"{d}/attn/qkv", f"{s}.attn.qkv")
      else:                                          # GSA
        m.linear(f"{d}/attn/q", f"{s}.attn.q")
        m.linear(f"{d}/attn/kv", f"{s}.attn.kv")
        if blk.attn.sr is not None:
          m.conv(f"{d}/attn/sr", f"{s}.attn.sr")
          m.ln(f"{d}/attn/norm", f"{s}.attn.norm")
      m.linear(f"{d}/attn/proj", f"{s}.attn.proj")
  m.ln("norm", "norm")
  _head(m, "head/fc", "head", model)


# -- ConViT (convit.py) ----------------------------------------------------------
def _map_convit(m, model):
  m.conv("patch_embed", "patch_embed.proj")
  m.raw("cls_token", "cls_token")
  m.raw("pos_embed", "pos_embed")
  for i, blk in enumerate(model.blocks_):
    d, s = f"blocks_/{i}", f"blocks.{i}"
    m.ln(f"{d}/norm1", f"{s}.norm1")
    m.ln(f"{d}/norm2", f"{s}.norm2")
    m.mlp(f"{d}/mlp", f"{s}.mlp")
    if isinstance(blk.attn, MultiHeadAttention):   # MHSA, qkv without bias
      m.mha(f"{d}/attn", f"{s}.attn", blk.attn.num_heads, bias=False)
    else:                                          # GPSA
      m.linear(f"{d}/attn/qk", f"{s}.attn.qk", bias=False)
      m.linear(f"{d}/attn/v", f"{s}.attn.v", bias=False)
      m.linear(f"{d}/attn/proj", f"{s}.attn.proj")
      m.linear(f"{d}/attn/pos_proj", f"{s}.attn.pos_proj")
      m.raw(f"{d}/attn/gating_param", f"{s}.attn.gating_param")
  m.ln("norm", "norm")
  _head(m, "head/fc", "head", model)


# -- SHViT (shvit.py) ----------------------------------------------------------
def _convbn(m, dst, src):
  m.conv(f"{dst}/conv", f"{src}.c", bias=False)
  m.bn(f"{dst}/bn", f"{src}.bn")


def _ffn(m, dst, src):
  _convbn(m, f"{dst}/pw1", f"{src}.pw1")
  _convbn(m, f"{dst}/pw2", f"{src}.pw2")


def _map_shvit(m, model):
  n_stem = len(model.stem.layers)
  for k in range(0, n_stem, 2):
    _convbn(m, f"stem/layers/{k}", f"patch_embed.{k}")
  for i, (down, stage) in enumerate(zip(model.downs, model.stages)):
    if down is not None:
      d, s = f"downs/{i}/layers", f"stages.{i}.downsample"
      _convbn(m, f"{d}/0/m", f"{s}.0.m")
      _ffn(m, f"{d}/1/m", f"{s}.1.m")
      for c in ("conv1", "conv2", "conv3"):
        _convbn(m, f"{d}/2/{c}", f"{s}.2.{c}")
      m.conv_as_linear(f"{d}/2/se/reduce", f"{s}.2.se.fc1")
      m.conv_as_linear(f"{d}/2/se/expand", f"{s}.2.se.fc2")
      _convbn(m, f"{d}/3/m", f"{s}.3.m")
      _ffn(m, f"{d}/4/m", f"{s}.4.m")
    for j, blk in enumerate(stage):
      d, s = f"stages/{i}/{j}", f"stages.{i}.blocks.{j}"
      _convbn(m, f"{d}/conv", f"{s}.conv.m")
      _ffn(m, f"{d}/ffn", f"{s}.ffn.m")
      if blk.attn is not None:
        m.ln(f"{d}/attn/pre_norm", f"{s}.mixer.m.pre_norm")
        _convbn(m, f"{d}/attn/qkv", f"{s}.mixer.m.qkv")
        _convbn(m, f"{d}/attn/proj", f"{s}.mixer.m.proj.1")
  m.bn("head_bn", "head.bn")
  if model.num_classes > 0:
    m.linear("head", "head.l")


# -- CrossViT (crossvit.py) ------------------------------------------------------
def _map_crossvit(m, model):
  for b in range(2):
    m.conv(f"patch_embed/{b}", f"patch_embed.{b}.proj")
    m.raw(f"cls_token/{b}", f"cls_token_{b}")
    m.raw(f"pos_embed/{b}", f"pos_embed_{b}")
    m.ln(f"norms/{b}", f"norm.{b}")
    if model.num_classes > 0:
      m.linear(f"heads/{b}", f"head.{b}")
  for k, (branches, fusion) in enumerate(model.multiscale):
    for b, blocks in enumerate(branches):
      for j, blk in enumerate(blocks):
        _block(m, f"multiscale/{k}/0/{b}/{j}", f"blocks.{k}.blocks.{b}.{j}",
               blk)
    for b, fu in enumerate(fusion):
      d, s = f"multiscale/{k}/1/{b}", f"blocks.{k}"
      if not fu.same:
        m.ln(f"{d}/proj_norm", f"{s}.projs.{b}.0")
        m.linear(f"{d}/proj", f"{s}.projs.{b}.2")
        m.ln(f"{d}/revert_norm", f"{s}.revert_projs.{b}.0")
        m.linear(f"{d}/revert", f"{s}.revert_projs.{b}.2")
      m.ln(f"{d}/norm", f"{s}.fusion.{b}.norm1")
      for w in ("wq", "wk", "wv", "proj"):
        m.linear(f"{d}/attn/{w}", f"{s}.fusion.{b}.attn.{w}")


# -- MaxViT (maxxvit.py, the *_tf_* models) --------------------------------------
def _tf_rel_table(t):
  """timm RelPosBiasTf table [heads, 2W-1, 2W-1] indexed by (key - query)
  -> Swin layout [(2W-1)^2, heads] indexed by (query - key)."""
  t = t[:, ::-1, ::-1]
  return np.ascontiguousarray(t.transpose(1, 2, 0).reshape(-1, t.shape[0]))


def _map_maxvit(m, model):
  m.conv("stem/layers/0", "stem.conv1")
  m.bn("stem/layers/1", "stem.norm1")
  m.conv("stem/layers/3", "stem.conv2")
  for i, stage in enumerate(model.stages):
    for j, (mb, blk_a, grid_a) in enumerate(stage):
      d, s = f"stages/{i}/{j}", f"stages.{i}.blocks.{j}"
      if mb.shortcut is not None:
        m.conv(f"{d}/0/shortcut", f"{s}.conv.shortcut.expand")
      m.bn(f"{d}/0/pre_norm", f"{s}.conv.pre_norm")
      m.conv(f"{d}/0/conv1", f"{s}.conv.conv1_1x1", bias=False)
      m.bn(f"{d}/0/norm1", f"{s}.conv.norm1")
      m.conv(f"{d}/0/conv2", f"{s}.conv.conv2_kxk", bias=False)
      m.bn(f"{d}/0/norm2", f"{s}.conv.norm2")
      m.conv_as_linear(f"{d}/0/se/reduce", f"{s}.conv.se.fc1")
      m.conv_as_linear(f"{d}/0/se/expand", f"{s}.conv.se.fc2")
      m.conv(f"{d}/0/conv3", f"{s}.conv.conv3_1x1")
      for k, part in ((1, "attn_block"), (2, "attn_grid")):
        dd, ss = f"{d}/{k}", f"{s}.{part}"
        _block(m, dd, ss, blk_a)
        m.linear(f"{dd}/attn/qkv", f"{ss}.attn.qkv")
        m.linear(f"{dd}/attn/proj", f"{ss}.attn.proj")
        m.raw(f"{dd}/attn/relative_position_bias_table",
              f"{ss}.attn.rel_pos.relative_position_bias_table", _tf_rel_table)
  m.ln("norm", "head.norm")
  m.linear("pre_logits", "head.pre_logits.fc")
  _head(m, "head", "head.fc", model)
