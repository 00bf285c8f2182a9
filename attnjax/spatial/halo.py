"""HaloNet blocked local self-attention (Vaswani et al. 2021, "Scaling Local
Self-Attention for Parameter Efficient Visual Backbones").

The map is cut into non-overlapping `b x b` query blocks; every query of a
block attends to the `(b + 2h) x (b + 2h)` window made of its block extended
by a halo of `h` pixels on each side. Logits carry factorized relative
position embeddings (Stand-Alone Self-Attention / HaloNet):

    logit(t, s) = scale * q_t . k_s + q_t . (rel_h[dy] + rel_w[dx])

with `dy = (key row in window) - (query row in block) + win - 1`,
`win = b + 2h`: the layout of timm's `PosEmbedRel` (tables of `2 win - 1`
rows of `head_dim`, shared by the heads; a per-head table `[N, 2 win - 1, Hd]`
is accepted too). The relative term is not multiplied by `scale` (timm's
default `scale_pos_embed=False`).

Memory and FLOPs are linear in the number of pixels: keys/values are gathered
once per block (`(1 + 2h/b)^2` copies), logits are `[blocks, b^2, win^2]`.

Borders: the original code zero-pads keys and lets queries attend to the
padding; here padded keys (the halo outside the image and the end padding to
a multiple of `b`) are masked, so the output never depends on the padding.
An optional `key_mask [B, H, W]` (True = attend) masks more keys; a query
with nothing to attend to returns zeros.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnjax._dispatch import Op
from attnjax.spatial._common import HeadGated
from attnjax.spatial._common import (heads_and_scale, check_channels_last,
                                     check_spatial_qkv, default_scale,
                                     dense_attention_reference,
                                     flatten_spatial, masked_softmax,
                                     repeat_kv, to_tuple)

__all__ = ["halo_attention", "halo_attention_reference", "HaloAttention",
           "HALO_ATTENTION"]

HALO_ATTENTION = Op("spatial.halo_attention")


def _check(query, key, value, block_size, halo_size, rel_h, rel_w, key_mask):
  nd, n, _ = check_spatial_qkv(query, key, value, spatial_dims=(2,))
  block = to_tuple("block_size", block_size, 2)
  halo = to_tuple("halo_size", halo_size, 2, minimum=0)
  d = query.shape[-1]
  for name, rel, b, h in (("rel_h", rel_h, block[0], halo[0]),
                          ("rel_w", rel_w, block[1], halo[1])):
    if rel is None:
      continue
    rows = 2 * (b + 2 * h) - 1
    if tuple(rel.shape) not in ((rows, d), (n, rows, d)):
      raise ValueError(
          f"`{name}` must have shape [2*(block+2*halo)-1, head_dim]=({rows}, "
          f"{d}) or [heads, ...]=({n}, {rows}, {d}), got {tuple(rel.shape)} "
          f"(query shape {tuple(query.shape)}).")
  if key_mask is not None:
    want = (query.shape[0],) + tuple(query.shape[1:3])
    if tuple(key_mask.shape) != want or key_mask.dtype != jnp.bool_:
      raise ValueError(
          f"`key_mask` must be bool [batch, H, W]={want}, got "
          f"{tuple(key_mask.shape)} {key_mask.dtype}.")
  return n, block, halo


def _rel_table(rel, n):
  """[L, D] | [N, L, D] -> [N, L, D]."""
  return jnp.broadcast_to(rel, (n,) + rel.shape[-2:]) if rel.ndim == 2 else rel


def _xla(config, query, key, value, *, block, halo, rel_h, rel_w, key_mask,
         scale, window_bias=None):
  """`window_bias` (internal, used by HAT's OCAB): an additive logit bias
  [N, bh, bw, wh, ww] indexed by (query in block, key in window)."""
  del config
  b_, hgt, wid, n, d = query.shape
  (bh, bw), (hh, hw) = block, halo
  wh, ww = bh + 2 * hh, bw + 2 * hw
  ph, pw = -(-hgt // bh) * bh, -(-wid // bw) * bw
  nh, nw = ph // bh, pw // bw
  if key_mask is not None:     # masked slots never reach values or grads
    km = key_mask[..., None, None]
    key, value = jnp.where(km, key, 0), jnp.where(km, value, 0)
  key, value = repeat_kv(key, n), repeat_kv(value, n)
  qp = jnp.pad(query, [(0, 0), (0, ph - hgt), (0, pw - wid), (0, 0), (0, 0)])
  qb = qp.reshape(b_, nh, bh, nw, bw, n, d).transpose(0, 1, 3, 2, 4, 5, 6)
  # Key windows: pad by the halo (and the end padding), gather per block.
  idx_h = np.arange(nh)[:, None] * bh + np.arange(wh)[None]      # [nh, wh]
  idx_w = np.arange(nw)[:, None] * bw + np.arange(ww)[None]      # [nw, ww]
  pads = [(0, 0), (hh, hh + ph - hgt), (hw, hw + pw - wid)]

  def windows(x):
    x = jnp.pad(x, pads + [(0, 0)] * (x.ndim - 3))
    x = x[:, idx_h][:, :, :, idx_w]        # [B, nh, wh, nw, ww, ...]
    return jnp.moveaxis(x, 3, 2)           # [B, nh, nw, wh, ww, ...]

  kb, vb = windows(key), windows(value)
  valid = np.zeros((ph + 2 * hh, pw + 2 * hw), bool)
  valid[hh:hh + hgt, hw:hw + wid] = True
  ok = jnp.asarray(valid[idx_h][:, :, idx_w].transpose(0, 2, 1, 3))[None]
  if key_mask is not None:
    ok = ok & windows(key_mask)
  logits = jnp.einsum("bijyxnd,bijYXnd->bijnyxYX", qb, kb,
                      preferred_element_type=jnp.float32) * scale
  for a, rel, bs, w in ((0, rel_h, bh, wh), (1, rel_w, bw, ww)):
    if rel is None:
      continue
    # [N, b, win, D]: embedding of (key in window) - (query in block).
    idx = np.arange(w)[None, :] - np.arange(bs)[:, None] + w - 1
    r = _rel_table(rel, n)[:, idx]
    if a == 0:
      t = jnp.einsum("bijyxnd,nyYd->bijnyxY", qb, r.astype(qb.dtype),
                     preferred_element_type=jnp.float32)
      logits = logits + t[..., None]
    else:
      t = jnp.einsum("bijyxnd,nxXd->bijnyxX", qb, r.astype(qb.dtype),
                     preferred_element_type=jnp.float32)
      logits = logits + t[..., None, :]
  if window_bias is not None:
    logits = logits + window_bias.astype(jnp.float32)[None, None, None]
  shp = logits.shape
  logits = logits.reshape(*shp[:6], wh * ww)
  ok = ok.reshape(ok.shape[:3] + (1, 1, 1, wh * ww))
  p = masked_softmax(logits, ok)
  out = jnp.einsum("bijnyxs,bijsnd->bijyxnd", p.astype(vb.dtype),
                   vb.reshape(*vb.shape[:3], wh * ww, *vb.shape[-2:]),
                   preferred_element_type=jnp.float32)
  out = out.transpose(0, 1, 3, 2, 4, 5, 6).reshape(b_, ph, pw, n, -1)
  return out[:, :hgt, :wid].astype(query.dtype)


HALO_ATTENTION.register("xla", _xla)


def halo_attention(query, key, value, block_size, halo_size, *, rel_h=None,
                   rel_w=None, key_mask=None, scale: Optional[float] = None,
                   implementation=None):
  """HaloNet blocked local attention.

  Args:
    query: [B, H, W, N, Hd]; key/value [B, H, W, K, Hd|Hv], N % K == 0.
    block_size: int or (bh, bw): query block size b.
    halo_size: int or (hh, hw) >= 0: halo h (window b + 2h).
    rel_h, rel_w: optional relative embeddings [2(b+2h)-1, Hd] (shared by the
      heads, timm's layout) or [N, 2(b+2h)-1, Hd].
    key_mask: optional bool [B, H, W], True = may be attended.
    scale: logit scale of q.k (default 1/sqrt(Hd)); not applied to the
      relative term.
    implementation: dispatch (`HALO_ATTENTION`: 'xla').
  Returns: [B, H, W, N, Hv] in query.dtype.
  """
  n, block, halo = _check(query, key, value, block_size, halo_size, rel_h,
                          rel_w, key_mask)
  return HALO_ATTENTION(implementation, query, key, value, block=block,
                        halo=halo, rel_h=rel_h, rel_w=rel_w, key_mask=key_mask,
                        scale=default_scale(scale, query.shape[-1]))


def halo_attention_reference(query, key, value, block_size, halo_size, *,
                             rel_h=None, rel_w=None, key_mask=None,
                             scale: Optional[float] = None):
  """Dense attention over all pixels with HaloNet's mask and relative logits,
  built from pixel coordinates (materializes [S, S])."""
  n, block, halo = _check(query, key, value, block_size, halo_size, rel_h,
                          rel_w, key_mask)
  scale = default_scale(scale, query.shape[-1])
  b_, hgt, wid = query.shape[:3]
  ys, xs = np.meshgrid(np.arange(hgt), np.arange(wid), indexing="ij")
  ys, xs = ys.ravel(), xs.ravel()
  mask = np.ones((ys.size, ys.size), bool)
  rel_idx = []
  for pos, b, h in ((ys, block[0], halo[0]), (xs, block[1], halo[1])):
    start = (pos // b) * b - h                       # window start per query
    mask &= (pos[None, :] >= start[:, None]) & (
        pos[None, :] < start[:, None] + b + 2 * h)
    # key-in-window minus query-in-block + win - 1
    rel_idx.append(np.clip(pos[None, :] - pos[:, None] + h + (b + 2 * h) - 1,
                           0, 2 * (b + 2 * h) - 2))
  q = flatten_spatial(query).astype(jnp.float32)
  bias = jnp.zeros((b_, n, ys.size, ys.size), jnp.float32)
  for rel, idx in ((rel_h, rel_idx[0]), (rel_w, rel_idx[1])):
    if rel is not None:
      r = _rel_table(rel, n).astype(jnp.float32)[:, idx]   # [N, T, S, D]
      bias = bias + jnp.einsum("btnd,ntsd->bnts", q, r)
  m = jnp.asarray(mask)[None, None]
  if key_mask is not None:
    m = m & key_mask.reshape(b_, 1, 1, -1)
  out = dense_attention_reference(q.astype(query.dtype), flatten_spatial(key),
                                  flatten_spatial(value), m, bias, scale=scale)
  return out.reshape(query.shape[:-1] + value.shape[-1:])


class HaloAttention(HeadGated):
  """HaloNet attention layer on [B, H, W, C] (timm's `HaloAttn` without
  stride): `q` Linear(dim, dim), `kv` Linear(dim, 2 dim) (1x1 convs,
  bias=qkv_bias), relative embeddings `rel_h`, `rel_w` [2(b+2h)-1, head_dim]
  (normal * head_dim^-0.5 init, timm's). No output projection (the HaloNet
  bottleneck block's following 1x1 conv plays that role).
  """

  def __init__(self, dim: int, num_heads: int, block_size: int = 8,
               halo_size: int = 3, *, qkv_bias: bool = False,
               qk_scale: Optional[float] = None, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.dim, self.num_heads = dim, num_heads
    self.head_dim, self.scale = heads_and_scale(dim, num_heads, qk_scale)
    self.block_size = to_tuple("block_size", block_size, 2)
    self.halo_size = to_tuple("halo_size", halo_size, 2, minimum=0)
    lin = lambda o: nnx.Linear(dim, o, use_bias=qkv_bias, dtype=dtype,
                               param_dtype=param_dtype, rngs=rngs)
    self.q, self.kv = lin(dim), lin(2 * dim)
    std = self.head_dim ** -0.5
    rows = [2 * (b + 2 * h) - 1 for b, h in zip(self.block_size, self.halo_size)]
    self.rel_h = nnx.Param(std * jax.random.normal(
        rngs.params(), (rows[0], self.head_dim), param_dtype))
    self.rel_w = nnx.Param(std * jax.random.normal(
        rngs.params(), (rows[1], self.head_dim), param_dtype))

  def __call__(self, x, key_mask=None):
    check_channels_last(x, self.dim, 2)
    q = self.q(x).reshape(*x.shape[:-1], self.num_heads, self.head_dim)
    kv = self.kv(x).reshape(*x.shape[:-1], 2, self.num_heads, self.head_dim)
    out = halo_attention(q, kv[..., 0, :, :], kv[..., 1, :, :],
                         self.block_size, self.halo_size,
                         rel_h=self.rel_h[...].astype(q.dtype),
                         rel_w=self.rel_w[...].astype(q.dtype),
                         key_mask=key_mask, scale=self.scale)
    return self.gate_heads(out).reshape(x.shape)
