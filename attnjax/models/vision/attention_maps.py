"""Attention maps out of any attnjax vision model, for visualisation.

`attention_maps(model, images)` runs a recording view of the model once
(`nnx.with_attributes(model, only=Block, record=True)`: new module objects
sharing the model's arrays; the model itself is never modified) under
`nnx.capture`, every `Block` sowing its mixer's attention probabilities, and
returns
`{block_path: [B, heads, T, S]}` (T = S = tokens of that block's input,
row-major over the map; ViT-style models include the cls token).

How a layer's map is obtained (`layer_map`):
* `attnjax.MultiHeadAttention` with the default softmax primitive:
  `attnjax.attention_weights` of the layer's projected queries and keys
  (what its `sow_weights=True` records).
* any other mechanism whose output is a convex combination of values
  (window / shifted window / grid / neighborhood attention, agent attention,
  mixture-of-heads, ...): the layer's own primitive is called with one-hot
  "probe" values v[s] = e_s, so output row t is exactly the attention
  distribution of query t over keys s, whatever sparsity, padding, shift or
  routing the mechanism applies. No attention is re-implemented here; the
  probe needs S-wide values, so use it on small inputs.
"""

from __future__ import annotations

import functools
from typing import Dict

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnjax.nn import MultiHeadAttention
from attnjax.softmax import attention_weights, dot_product_attention
from attnjax import spatial as _spatial

_LAYER_MAPS = {}


def register_layer_map(cls):
  """Decorator: fn(layer, x) -> [B, N, T, S] for mixers of type `cls`."""
  def deco(fn):
    _LAYER_MAPS[cls] = fn
    return fn
  return deco


def _probe(spatial_shape, batch, heads, dtype=jnp.float32):
  s = int(np.prod(spatial_shape))
  eye = jnp.eye(s, dtype=dtype).reshape(*spatial_shape, 1, s)
  return jnp.broadcast_to(eye[None], (batch, *spatial_shape, heads, s))


def _probe_to_map(out, spatial_shape):
  """[B, *spatial, N, S] -> [B, N, T, S]."""
  b, n, s = out.shape[0], out.shape[-2], out.shape[-1]
  return jnp.moveaxis(out.reshape(b, -1, n, s), 2, 1)


@register_layer_map(MultiHeadAttention)
def _mha_map(layer, x):
  q, k, _ = layer.project_qkv(x)
  if type(layer) is MultiHeadAttention and layer.attention_fn is dot_product_attention:
    return attention_weights(q, k)
  fn = layer.attend                      # the layer's own attention
  if hasattr(layer, "router"):           # MoH: gates from the router
    from attnjax.sequence import moh_gates, mixture_of_heads_attention
    gates, _ = moh_gates(layer.router(x),
                         num_shared_heads=layer.num_shared_heads,
                         num_active_heads=layer.num_active_heads)
    # per-head maps of the routed heads, each scaled by its gate
    out = fn(q, k, _probe(x.shape[1:-1], x.shape[0], q.shape[-2]))
    return _probe_to_map(out * gates[..., None].astype(out.dtype), x.shape[1:-1])
  out = fn(q, k, _probe(x.shape[1:-1], x.shape[0], q.shape[-2]))
  return _probe_to_map(out, x.shape[1:-1])


def _spatial_qk(layer, x):
  qkv = layer.qkv(x).reshape(*x.shape[:-1], 3, layer.num_heads, layer.head_dim)
  return qkv[..., 0, :, :], qkv[..., 1, :, :]


@register_layer_map(_spatial.WindowAttention)
def _window_map(layer, x):    # also GridAttention (subclass)
  q, k = _spatial_qk(layer, x)
  sp = x.shape[1:-1]
  out = layer._attend(q, k, _probe(sp, x.shape[0], layer.num_heads), sp)
  return _probe_to_map(out, sp)


@register_layer_map(_spatial.NeighborhoodAttention)
def _na_map(layer, x):
  q, k = _spatial_qk(layer, x)
  sp = x.shape[1:-1]
  ks, dl = [], []
  for l, kk, d in zip(sp, layer.kernel_size, layer.dilation):
    if kk * d > l:            # the layer's own small-input rule
      d = max(1, l // kk)
      kk = min(kk, l)
    ks.append(kk)
    dl.append(d)
  rpb = None
  if layer.rpb is not None:
    sl = tuple(slice(kf - ke, kf + ke - 1) for kf, ke in zip(layer.kernel_size, ks))
    rpb = layer.rpb[...][(slice(None),) + sl]
  out = _spatial.neighborhood_attention(
      q, k, _probe(sp, x.shape[0], layer.num_heads), tuple(ks),
      dilation=tuple(dl), is_causal=layer.is_causal, scale=layer.scale, rpb=rpb)
  return _probe_to_map(out, sp)


def layer_map(layer, x, **mixer_kw):
  """Attention probabilities [B, N, T, S] of mixer `layer` on input x
  (`mixer_kw`: the extras its Block passes it, e.g. a token grid)."""
  if hasattr(layer, "attention_map"):
    return layer.attention_map(x, **mixer_kw)
  for cls in type(layer).__mro__:
    if cls in _LAYER_MAPS:
      return _LAYER_MAPS[cls](layer, x)
  raise NotImplementedError(
      f"no attention-map extractor for {type(layer).__name__}; register one "
      "with attention_maps.register_layer_map.")


def attention_maps(model, images) -> Dict[str, jax.Array]:
  """{path: [B, heads, T, S]} for every attention Block of `model`.

  The model is not modified: a view with `record=True` on its Blocks runs
  under `nnx.capture`, which collects the sown maps (and MoH losses, dropped
  here) without storing anything in any module.
  """
  return recorded(model, images, "attention_map")


def recorded(model, images, name: str) -> Dict[str, jax.Array]:
  """{block path: value}: what every attention Block sows under `name`
  ("attention_map", "block_input") when run as a recording view.

  The recording runs as one compiled program (`nnx.jit`, cached per model
  structure, input shape and `name`): run eagerly, every op of the model
  and of each probe was compiled on its own (a NAT or Swin tiny map took
  ~9 CPU-s to compile that way, ~2.5-4 CPU-s as one program). Same values
  up to float rounding (max abs difference ~2e-7 on those maps)."""
  return _recorded_jit(model, images, name)


@functools.partial(nnx.jit, static_argnames="name")
def _recorded_jit(model, images, name: str) -> Dict[str, jax.Array]:
  from attnjax.models.vision._layers import Block
  view = nnx.with_attributes(model, only=Block, record=True,
                             raise_if_not_found=False)
  _, sown = nnx.capture(view, nnx.Intermediate)(images)
  out = {}
  for path, v in nnx.to_flat_state(sown):
    if path and path[-1] == name:
      v = v.get_value() if isinstance(v, nnx.Variable) else v
      out["/".join(str(p) for p in path[:-1])] = (
          v[-1] if isinstance(v, tuple) else v)
  return out


@register_layer_map(_spatial.CSWinAttention)
def _cswin_map(layer, x):
  """Stripe attention probabilities (the LePE term is not attention)."""
  q, k = _spatial_qk(layer, x)
  sp = x.shape[1:-1]
  v = _probe(sp, x.shape[0], layer.num_heads)
  if layer.last_stage:
    out = _spatial.stripe_attention(q, k, v, 1, "full", scale=layer.scale)
  else:
    out = _spatial.cross_shaped_window_attention(q, k, v, layer.stripe_width,
                                                 scale=layer.scale)
  return _probe_to_map(out, sp)


@register_layer_map(_spatial.BiLevelRoutingAttention)
def _bra_map(layer, x):
  """Token-level routed attention probabilities (LCE on V excluded)."""
  q, k = _spatial_qk(layer, x)
  sp = x.shape[1:-1]
  out = _spatial.bi_level_routing_attention(
      q, k, _probe(sp, x.shape[0], layer.num_heads), layer.num_regions,
      min(layer.topk, layer.num_regions ** 2), scale=layer.scale)
  return _probe_to_map(out, sp)


@register_layer_map(_spatial.GPSA)
def _gpsa_map(layer, x):
  n, d = layer.num_heads, layer.head_dim
  qk = layer.qk(x).reshape(*x.shape[:-1], 2, n, d)
  sp = x.shape[1:-1]
  out = _spatial.gated_positional_attention(
      qk[..., 0, :, :], qk[..., 1, :, :], _probe(sp, x.shape[0], n),
      layer.pos_proj.kernel[...], layer.pos_proj.bias[...],
      layer.gating_param[...], scale=layer.scale)
  return _probe_to_map(out, sp)


@register_layer_map(_spatial.GlobalSubsampledAttention)
def _gsa_map(layer, x):
  """[B, N, T, S_sub]: queries over the sub-sampled keys."""
  n, d = layer.num_heads, layer.head_dim
  q = layer.q(x).reshape(*x.shape[:-1], n, d)
  xr = x
  if layer.sr is not None:
    r = layer.sr_ratio
    xr = jnp.pad(x, [(0, 0), (0, (-x.shape[1]) % r), (0, (-x.shape[2]) % r),
                     (0, 0)])
    xr = layer.norm(layer.sr(xr))
  k = layer.kv(xr).reshape(*xr.shape[:-1], 2, n, d)[..., 0, :, :]
  out = _spatial.subsampled_attention(
      q, k, _probe(xr.shape[1:-1], x.shape[0], n), scale=layer.scale)
  return _probe_to_map(out, x.shape[1:-1])


@register_layer_map(_spatial.ChannelAttention)
def _channel_map(layer, x):
  """[B, N, D, D]: each head's channel-to-channel attention (DaViT). The
  probe puts e_j at token j, so output token j, channel i = A[i, j]."""
  n, d = layer.num_heads, layer.head_dim
  qkv = layer.qkv(x).reshape(*x.shape[:-1], 3, n, d)
  b, sp = x.shape[0], x.shape[1:-1]
  s = int(np.prod(sp))
  if s < d:
    raise NotImplementedError(
        f"channel map needs >= head_dim ({d}) tokens, got {s}.")
  v = jnp.zeros((s, d)).at[jnp.arange(d), jnp.arange(d)].set(1.0)
  v = jnp.broadcast_to(v.reshape(*sp, 1, d), (b, *sp, n, d))
  out = _spatial.channel_attention(qkv[..., 0, :, :], qkv[..., 1, :, :], v,
                                   scale=layer.scale)
  out = out.reshape(b, s, n, d)[:, :d]          # [B, j, N, i]
  return jnp.transpose(out, (0, 2, 3, 1))       # [B, N, i, j]


@register_layer_map(_spatial.HiLoAttention)
def _hilo_map(layer, x):
  """[B, h_heads + l_heads, T, T]. Lo-Fi heads attend to average-pooled
  keys/values; since a pooled value is the mean of its cell's values, the
  probe (one-hot values, average-pooled the same way) gives the exact
  pixel-level weights p_cell / |cell|."""
  d, ws = layer.head_dim, layer.window_size
  sp, b = x.shape[1:-1], x.shape[0]
  maps = []
  if layer.h_heads > 0:
    qkv = layer.h_qkv(x).reshape(*x.shape[:-1], 3, layer.h_heads, d)
    out = _spatial.window_attention(qkv[..., 0, :, :], qkv[..., 1, :, :],
                                    _probe(sp, b, layer.h_heads), ws,
                                    scale=layer.scale)
    maps.append(_probe_to_map(out, sp))
  if layer.l_heads > 0:
    q = layer.l_q(x).reshape(*x.shape[:-1], layer.l_heads, d)
    xp = _spatial.average_pool(x, (ws, ws)) if ws > 1 else x
    k = layer.l_kv(xp).reshape(*xp.shape[:-1], 2, layer.l_heads, d)[..., 0, :, :]
    v = _probe(sp, b, layer.l_heads)
    v = _spatial.average_pool(v, (ws, ws)) if ws > 1 else v
    out = _spatial.subsampled_attention(q, k, v, scale=layer.scale)
    maps.append(_probe_to_map(out, sp))
  return jnp.concatenate(maps, axis=1)
