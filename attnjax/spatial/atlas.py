"""Atlas multi-scale attention (MSA) (Agrawal, Lian et al. 2025, "Atlas:
Multi-Scale Attention Improves Long Context Image Modeling", arXiv
2503.12355, Sec. 3.2 and Algorithm 1).

Scales (Sec. 3.2.1, Eq. 1): `X^(l) = S(X^(l-1))`, S a stride-s max-pool
(s x s tokens -> one), until the coarsest map fits in one k x k window
(`multiscale_pyramid`). Every scale is cut into non-overlapping k x k
windows; a window at scale l covers an s^j-times larger region than a
window at scale l + j, so it lies inside exactly one window of each coarser
scale (its coarse "child" windows, Fig. 4).

* Top-down (Eq. 2), `multiscale_top_down_attention`: the queries of a
  window W^(l) attend to the keys of W^(l) itself and of its child window at
  every coarser scale, `MHA(Q_l, [K_l .. K_L], [V_l .. V_L])`, one softmax
  over all of them. A query at (y, x) of scale l uses, at scale l + j, the
  window with index `(y // k // s^j, x // k // s^j)`. At the coarsest scale
  (one window) it is plain self-attention.
* Bottom-up (Eq. 3), `multiscale_bottom_up_attention`: a token of scale l
  at (y, x) attends to its direct parent window at scale l - 1, the k x k
  window containing (s y, s x): the k/s x k/s coarse tokens summarising one
  fine window attend to that window (the official code's
  `_aggregate_one2one_xattn`; `k % s == 0` required).

`MultiScaleAttention` (the MSA block of Algorithm 1 without its MLPs): per
scale a cross-window attention (`norm_q`, `norm_kv` LayerNorms, `q`
Linear(dim, dim), `kv` Linear(dim, 2 dim), `proj` Linear(dim, dim), the
parameters of the official `CrossWindowAttention`), then
1. `X^(l) += maxpool_s(X^(l-1))`, l = 2..L (fine to coarse);
2. top-down, l = L..1: `X^(l) += proj_l(MHA(q_l(X^(l)), kv_l(X^(l)),
   kv_{l+1}(X^(l+1)), ..., kv_L(X^(L))))` with the already updated coarser
   scales;
3. bottom-up, l = 2..L: `X^(l) += proj_l(MHA(q_l(X^(l)), kv_{l-1}(X^(l-1))))`.

Departures: maps need not be multiples of the window or of s: pooling is
ceil-mode (a partial s x s block pools its valid pixels), windows are padded
at the end and padded keys are masked (the official code requires exact
divisibility); windows are matched to child windows by spatial containment
(the official code repeats coarse windows in raster order, which is the same
whenever the coarser scale has a single window, its default layouts); the
official per-scale MLPs and position embeddings are not part of the layer;
the primitives are 2-D. `key_masks` (True = may be attended) mask keys
per scale: whatever a masked slot holds never reaches outputs or gradients,
a query with no valid key returns zeros.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnjax._dispatch import Op
from attnjax.spatial._common import HeadGated
from attnjax.spatial._common import (check_channels_last, check_floating,
                                     check_spatial_qkv, default_scale,
                                     dense_attention_reference,
                                     flatten_spatial, heads_and_scale,
                                     masked_softmax, repeat_kv)

__all__ = ["multiscale_top_down_attention",
           "multiscale_top_down_attention_reference",
           "multiscale_bottom_up_attention",
           "multiscale_bottom_up_attention_reference", "multiscale_pyramid",
           "MultiScaleAttention", "MULTISCALE_TOP_DOWN", "MULTISCALE_BOTTOM_UP"]

MULTISCALE_TOP_DOWN = Op("spatial.multiscale_top_down_attention")
MULTISCALE_BOTTOM_UP = Op("spatial.multiscale_bottom_up_attention")


def _cdiv(a, b):
  return -(-a // b)


def _pos_int(name, v, lo=1):
  if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < lo:
    raise ValueError(f"`{name}` must be an int >= {lo}, got {v!r}.")
  return int(v)


def _check_mask(name, m, want):
  if m is not None and (tuple(m.shape) != tuple(want) or m.dtype != jnp.bool_):
    raise ValueError(f"`{name}` must be bool [batch, H, W]={tuple(want)}, got "
                     f"{tuple(m.shape)} {m.dtype}.")


def _check_top_down(query, keys, values, window_size, stride, key_masks):
  window_size = _pos_int("window_size", window_size)
  stride = _pos_int("stride", stride)
  keys, values = list(keys), list(values)
  if not keys or len(keys) != len(values):
    raise ValueError(f"`keys` and `values` must be non-empty sequences of the "
                     f"same length (one per scale), got {len(keys)} and "
                     f"{len(values)}.")
  if key_masks is not None and len(key_masks) != len(keys):
    raise ValueError(f"`key_masks` must have one entry per scale "
                     f"({len(keys)}), got {len(key_masks)}.")
  h, w = query.shape[1:3]
  for j, (k, v) in enumerate(zip(keys, values)):
    check_spatial_qkv(query, k, v, spatial_dims=(2,), same_spatial=False)
    want = (_cdiv(h, stride ** j), _cdiv(w, stride ** j))
    if tuple(k.shape[1:3]) != want:
      raise ValueError(
          f"`keys[{j}]` must be the scale-{j} map of the query's "
          f"[B, H, W]=({query.shape[0]}, {h}, {w}) with stride {stride}: "
          f"spatial {want}, got shape {tuple(k.shape)}.")
    if key_masks is not None:
      _check_mask(f"key_masks[{j}]", key_masks[j], k.shape[:3])
  return window_size, stride, keys, values


def _check_bottom_up(query, key, value, window_size, stride, key_mask):
  window_size = _pos_int("window_size", window_size)
  stride = _pos_int("stride", stride)
  if window_size % stride:
    raise ValueError(f"`window_size` ({window_size}) must be a multiple of "
                     f"`stride` ({stride}).")
  check_spatial_qkv(query, key, value, spatial_dims=(2,), same_spatial=False)
  want = tuple(_cdiv(x, stride) for x in key.shape[1:3])
  if tuple(query.shape[1:3]) != want:
    raise ValueError(
        f"`query` must be the next coarser scale of `key` (stride {stride}): "
        f"spatial {want}, got query {tuple(query.shape)}, key "
        f"{tuple(key.shape)}.")
  _check_mask("key_mask", key_mask, key.shape[:3])
  return window_size, stride


def _windows(x, m):
  """[B, H, W, ...] -> [B, ceil(H/m), ceil(W/m), m*m, ...] (end-padded)."""
  b, h, w = x.shape[:3]
  ph, pw = _cdiv(h, m) * m, _cdiv(w, m) * m
  x = jnp.pad(x, [(0, 0), (0, ph - h), (0, pw - w)] + [(0, 0)] * (x.ndim - 3))
  x = x.reshape(b, ph // m, m, pw // m, m, *x.shape[3:]).swapaxes(2, 3)
  return x.reshape(b, ph // m, pw // m, m * m, *x.shape[5:])


def _unwindow(x, m, h, w):
  b, nh, nw = x.shape[:3]
  x = x.reshape(b, nh, nw, m, m, *x.shape[4:]).swapaxes(2, 3)
  return x.reshape(b, nh * m, nw * m, *x.shape[5:])[:, :h, :w]


def _key_windows(k, v, mask, m, n):
  """Windows of (masked-slot-zeroed, head-repeated) keys/values + validity."""
  ok = jnp.ones(k.shape[:3], bool) if mask is None else mask
  k = jnp.where(ok[..., None, None], k, 0)
  v = jnp.where(ok[..., None, None], v, 0)
  return (_windows(repeat_kv(k, n), m), _windows(repeat_kv(v, n), m),
          _windows(ok, m))


def _attend(qw, kw, vw, okw, scale):
  logits = jnp.einsum("bijtnd,bijsnd->bijnts", qw, kw,
                      preferred_element_type=jnp.float32) * scale
  p = masked_softmax(logits, okw[:, :, :, None, None, :])
  return jnp.einsum("bijnts,bijsnd->bijtnd", p.astype(vw.dtype), vw,
                    preferred_element_type=jnp.float32)


def _top_down_xla(config, query, keys, values, *, window_size, stride,
                  key_masks, scale):
  del config
  m, n = window_size, query.shape[-2]
  h, w = query.shape[1:3]
  qw = _windows(query, m)
  nh, nw = qw.shape[1:3]
  ks, vs, oks = [], [], []
  for j, (k, v) in enumerate(zip(keys, values)):
    kw, vw, okw = _key_windows(k, v, None if key_masks is None else
                               key_masks[j], m, n)
    ih, iw = np.arange(nh) // stride ** j, np.arange(nw) // stride ** j
    pick = lambda x: x[:, ih][:, :, iw]          # child window of each window
    ks.append(pick(kw))
    vs.append(pick(vw))
    oks.append(pick(okw))
  out = _attend(qw, jnp.concatenate(ks, 3), jnp.concatenate(vs, 3),
                jnp.concatenate(oks, 3), scale)
  return _unwindow(out, m, h, w).astype(query.dtype)


def _bottom_up_xla(config, query, key, value, *, window_size, stride,
                   key_mask, scale):
  del config
  m, n = window_size, query.shape[-2]
  h, w = query.shape[1:3]
  qw = _windows(query, m // stride)     # coarse blocks <-> fine windows
  kw, vw, okw = _key_windows(key, value, key_mask, m, n)
  out = _attend(qw, kw, vw, okw, scale)
  return _unwindow(out, m // stride, h, w).astype(query.dtype)


MULTISCALE_TOP_DOWN.register("xla", _top_down_xla)
MULTISCALE_BOTTOM_UP.register("xla", _bottom_up_xla)


def multiscale_top_down_attention(query, keys: Sequence, values: Sequence,
                                  window_size: int = 16, *, stride: int = 4,
                                  key_masks: Optional[Sequence] = None,
                                  scale: Optional[float] = None,
                                  implementation=None):
  """Atlas top-down cross-scale window attention (Eq. 2).

  Args:
    query: [B, H, W, N, D], the queries of scale l.
    keys, values: per scale l, l+1, ..., L: [B, ceil(H/s^j), ceil(W/s^j), K,
      D | Dv] (keys[0] at the query's scale), N % K == 0.
    window_size: k (k x k windows at every scale).
    stride: s, the max-pool stride between scales.
    key_masks: optional per-scale bool [B, H_j, W_j] (or None entries).
    scale: logit scale (default 1/sqrt(D)).
    implementation: dispatch (`MULTISCALE_TOP_DOWN`: 'xla').
  Returns: [B, H, W, N, Dv] in query.dtype. Each query sees
  `len(keys) * k^2` keys: O(H W L k^2) work.
  """
  window_size, stride, keys, values = _check_top_down(
      query, keys, values, window_size, stride, key_masks)
  return MULTISCALE_TOP_DOWN(implementation, query, keys, values,
                             window_size=window_size, stride=stride,
                             key_masks=None if key_masks is None
                             else list(key_masks),
                             scale=default_scale(scale, query.shape[-1]))


def multiscale_bottom_up_attention(query, key, value, window_size: int = 16,
                                   *, stride: int = 4, key_mask=None,
                                   scale: Optional[float] = None,
                                   implementation=None):
  """Atlas bottom-up attention (Eq. 3): coarse token (y, x) attends to the
  fine k x k window containing (s y, s x).

  Args:
    query: [B, ceil(Hf/s), ceil(Wf/s), N, D] (scale l).
    key, value: [B, Hf, Wf, K, D | Dv] (scale l - 1).
    window_size: k, a multiple of `stride`.
    key_mask: optional bool [B, Hf, Wf].
  Returns: [B, ceil(Hf/s), ceil(Wf/s), N, Dv] in query.dtype.
  """
  window_size, stride = _check_bottom_up(query, key, value, window_size,
                                         stride, key_mask)
  return MULTISCALE_BOTTOM_UP(implementation, query, key, value,
                              window_size=window_size, stride=stride,
                              key_mask=key_mask,
                              scale=default_scale(scale, query.shape[-1]))


def _coords(h, w):
  ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  return ys.ravel(), xs.ravel()


def multiscale_top_down_attention_reference(query, keys, values,
                                            window_size: int = 16, *,
                                            stride: int = 4, key_masks=None,
                                            scale: Optional[float] = None):
  """Dense attention over the concatenated tokens of all scales with the
  child-window mask built from coordinates (materializes [T, sum S_j])."""
  window_size, stride, keys, values = _check_top_down(
      query, keys, values, window_size, stride, key_masks)
  scale = default_scale(scale, query.shape[-1])
  b, h, w = query.shape[:3]
  qy, qx = _coords(h, w)
  masks, bm = [], []
  for j, k in enumerate(keys):
    ky, kx = _coords(*k.shape[1:3])
    f = stride ** j * window_size
    masks.append((qy[:, None] // f == ky[None] // window_size)
                  & (qx[:, None] // f == kx[None] // window_size))
    bm.append(jnp.ones((b, ky.size), bool) if key_masks is None
              or key_masks[j] is None else key_masks[j].reshape(b, -1))
  m = jnp.asarray(np.concatenate(masks, 1))[None, None] & jnp.concatenate(
      bm, 1)[:, None, None, :]
  out = dense_attention_reference(
      flatten_spatial(query),
      jnp.concatenate([flatten_spatial(k) for k in keys], 1),
      jnp.concatenate([flatten_spatial(v) for v in values], 1), m,
      scale=scale)
  return out.reshape(query.shape[:-1] + values[0].shape[-1:])


def multiscale_bottom_up_attention_reference(query, key, value,
                                             window_size: int = 16, *,
                                             stride: int = 4, key_mask=None,
                                             scale: Optional[float] = None):
  """Dense attention with the parent-window mask from coordinates."""
  window_size, stride = _check_bottom_up(query, key, value, window_size,
                                         stride, key_mask)
  scale = default_scale(scale, query.shape[-1])
  b = query.shape[0]
  qy, qx = _coords(*query.shape[1:3])
  ky, kx = _coords(*key.shape[1:3])
  mask = ((qy[:, None] * stride // window_size == ky[None] // window_size)
          & (qx[:, None] * stride // window_size == kx[None] // window_size))
  m = jnp.asarray(mask)[None, None]
  if key_mask is not None:
    m = m & key_mask.reshape(b, 1, 1, -1)
  out = dense_attention_reference(flatten_spatial(query),
                                  flatten_spatial(key), flatten_spatial(value),
                                  m, scale=scale)
  return out.reshape(query.shape[:-1] + value.shape[-1:])


def _max_pool(x, s):
  """Ceil-mode s x s max-pool of [B, H, W, C] (partial blocks pool their
  valid pixels)."""
  b, h, w, c = x.shape
  ph, pw = _cdiv(h, s) * s, _cdiv(w, s) * s
  lo = jnp.finfo(x.dtype).min
  x = jnp.pad(x, [(0, 0), (0, ph - h), (0, pw - w), (0, 0)],
              constant_values=lo)
  return x.reshape(b, ph // s, s, pw // s, s, c).max((2, 4))


def multiscale_pyramid(x, num_scales: Optional[int] = None, *, stride: int = 4,
                       window_size: int = 16):
  """Atlas's scales (Eq. 1): [x, maxpool_s(x), maxpool_s^2(x), ...] on
  [B, H, W, C]; `num_scales` of them, or (None) until a map fits in one
  window_size x window_size window."""
  check_floating("x", x)
  if x.ndim != 4:
    raise ValueError(f"`x` must be [B, H, W, C], got {tuple(x.shape)}.")
  stride = _pos_int("stride", stride, 2)
  window_size = _pos_int("window_size", window_size)
  if num_scales is not None:
    _pos_int("num_scales", num_scales)
  out = [x]
  while (len(out) < num_scales if num_scales is not None
         else max(out[-1].shape[1:3]) > window_size):
    out.append(_max_pool(out[-1], stride))
  return out


class _ScaleAttention(HeadGated):
  """One scale's cross-window attention parameters (official
  `CrossWindowAttention` + its block's two pre-norms). Its head gate
  scales head h before `proj` in both passes that use this scale's
  projection (top-down into this scale, bottom-up into it)."""

  def __init__(self, dim, num_heads, qkv_bias, dtype, param_dtype, rngs):
    self.num_heads = num_heads
    ln = lambda: nnx.LayerNorm(dim, dtype=dtype, param_dtype=param_dtype,
                               rngs=rngs)
    lin = lambda o, bias: nnx.Linear(dim, o, use_bias=bias, dtype=dtype,
                                     param_dtype=param_dtype, rngs=rngs)
    self.norm_q, self.norm_kv = ln(), ln()
    self.q, self.kv, self.proj = lin(dim, qkv_bias), lin(2 * dim, qkv_bias), \
        lin(dim, True)


class MultiScaleAttention(nnx.Module):
  """Atlas MSA block (Algorithm 1, without the per-scale MLPs) on
  [B, H, W, C]: builds `num_scales` max-pool scales (or takes the list of
  scale maps) and returns the list of updated scale maps."""

  def __init__(self, dim: int, num_heads: int, num_scales: int,
               window_size: int = 16, stride: int = 4, *,
               qkv_bias: bool = True, qk_scale: Optional[float] = None,
               dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.dim, self.num_heads = dim, num_heads
    self.head_dim, self.scale = heads_and_scale(dim, num_heads, qk_scale)
    self.num_scales = _pos_int("num_scales", num_scales)
    self.window_size = _pos_int("window_size", window_size)
    self.stride = _pos_int("stride", stride, 2)
    if window_size % stride:
      raise ValueError(f"`window_size` ({window_size}) must be a multiple of "
                       f"`stride` ({stride}).")
    self.scales = nnx.List([_ScaleAttention(dim, num_heads, qkv_bias, dtype,
                                            param_dtype, rngs)
                            for _ in range(num_scales)])

  def _heads(self, x):
    return x.reshape(*x.shape[:-1], self.num_heads, -1)

  def _kv(self, l, x):
    kv = self.scales[l].kv(self.scales[l].norm_kv(x))
    return self._heads(kv[..., :self.dim]), self._heads(kv[..., self.dim:])

  def __call__(self, x):
    if isinstance(x, (list, tuple)):
      xs = list(x)
      if len(xs) != self.num_scales:
        raise ValueError(f"expected {self.num_scales} scale maps, got "
                         f"{len(xs)}.")
    else:
      check_channels_last(x, self.dim, 2)
      xs = multiscale_pyramid(x, self.num_scales, stride=self.stride,
                              window_size=self.window_size)
    for l, xl in enumerate(xs):
      check_channels_last(xl, self.dim, 2, name=f"x[{l}]")
    s, k, L = self.stride, self.window_size, self.num_scales
    for l in range(1, L):                         # X^(l) += S(X^(l-1))
      xs[l] = xs[l] + _max_pool(xs[l - 1], s)
    for l in range(L - 1, -1, -1):                # top-down, coarse to fine
      blk = self.scales[l]
      q = self._heads(blk.q(blk.norm_q(xs[l])))
      kvs = [self._kv(m, xs[m]) for m in range(l, L)]
      o = multiscale_top_down_attention(q, [a for a, _ in kvs],
                                        [b for _, b in kvs], k, stride=s,
                                        scale=self.scale)
      xs[l] = xs[l] + blk.proj(blk.gate_heads(o).reshape(xs[l].shape))
    for l in range(1, L):                         # bottom-up, fine to coarse
      blk = self.scales[l]
      q = self._heads(blk.q(blk.norm_q(xs[l])))
      kk, vv = self._kv(l - 1, xs[l - 1])
      o = multiscale_bottom_up_attention(q, kk, vv, k, stride=s,
                                         scale=self.scale)
      xs[l] = xs[l] + blk.proj(blk.gate_heads(o).reshape(xs[l].shape))
    return xs
