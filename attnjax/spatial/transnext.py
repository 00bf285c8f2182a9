"""TransNeXt aggregated attention (Shi 2024, "TransNeXt: Robust Foveal Visual
Perception for Vision Transformers"): pixel-focused attention.

Every query attends, through ONE softmax, to

  * its `k x k` sliding-window neighbours (fine tokens, zero-padded at the
    borders and the padding masked), with a learned bias per window offset,
  * `P` pooled tokens (coarse, e.g. an adaptive-average-pooled map), with a
    bias per (query pixel, pooled token) (TransNeXt: a continuous relative
    position bias from an MLP, see `AggregatedAttention`),

using length-scaled cosine attention with a learnable query embedding:

    q' = (l2norm(q) + query_embedding) * temperature * log(n_local + P)
    logits = q' . l2norm(k) (+ bias)

where `n_local` is the number of in-image neighbours of the query (TransNeXt's
`seq_length_scale`; the temperature is `softplus` of the layer's parameter).
After the softmax, the weights of the local tokens get the query-dependent
"learnable tokens" term (TransNeXt's dynamic local bias):

    out = sum_local (p + l2norm(q) . T[:, j] + Tb[j]) v_j + sum_pool p v_j

There is no 1/sqrt(d) scale. `key_mask [B, H, W]` (True = valid) masks local
keys (their values are zeroed, so the learnable term never reads them);
pooled tokens are always attended, so every row has keys. `n_local` counts
in-image neighbours regardless of `key_mask`.

Primitive: `aggregated_attention(q, k, v, k_pool, v_pool, window_size, ...)`
with q/k/v `[B, H, W, N, Hd]` and pooled `[B, P, N, Hd]`. Memory is linear
in pixels (`k^2` neighbours gathered per pixel, `P` pooled keys).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnjax._dispatch import Op
from attnjax.spatial._common import HeadGated
from attnjax.spatial._common import (check_channels_last, check_floating,
                                     heads_and_scale, masked_softmax,
                                     to_tuple)

__all__ = ["aggregated_attention", "aggregated_attention_reference",
           "AggregatedAttention", "adaptive_avg_pool", "pool_relative_coords",
           "AGGREGATED_ATTENTION"]

AGGREGATED_ATTENTION = Op("spatial.aggregated_attention")


def _l2n(x):
  """F.normalize(x, dim=-1): x / max(|x|, 1e-12), float32."""
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.sqrt(jnp.sum(x * x, -1, keepdims=True)), 1e-12)


def _check(q, k, v, kp, vp, window_size, qe, temp, local_bias, pool_bias,
           tokens, tokens_bias, key_mask):
  for name, x in (("query", q), ("key", k), ("value", v), ("key_pool", kp),
                  ("value_pool", vp)):
    check_floating(name, x)
  shapes = (f"query={tuple(q.shape)}, key={tuple(k.shape)}, "
            f"value={tuple(v.shape)}, key_pool={tuple(kp.shape)}, "
            f"value_pool={tuple(vp.shape)}")
  if q.ndim != 5 or k.shape != q.shape or v.shape[:-1] != q.shape[:-1]:
    raise ValueError(f"`query`/`key` must be [B, H, W, N, Hd] (same shape) "
                     f"and `value` [B, H, W, N, Hv], got {shapes}.")
  b, _, _, n, d = q.shape
  if (kp.ndim != 4 or kp.shape[0] != b or kp.shape[2:] != (n, d)
      or vp.shape != kp.shape[:3] + (v.shape[-1],)):
    raise ValueError(f"`key_pool` must be [B, P, N, Hd] and `value_pool` "
                     f"[B, P, N, Hv] matching the query, got {shapes}.")
  if not (isinstance(window_size, (int, np.integer)) and window_size >= 1
          and window_size % 2 == 1):
    raise ValueError(f"`window_size` must be an odd int >= 1, got "
                     f"{window_size!r}.")
  kk, p = window_size * window_size, kp.shape[1]
  s = q.shape[1] * q.shape[2]
  for name, x, want in (("query_embedding", qe, (n, d)),
                        ("temperature", temp, (n,)),
                        ("local_bias", local_bias, (n, kk)),
                        ("learnable_tokens", tokens, (n, d, kk)),
                        ("learnable_bias", tokens_bias, (n, kk))):
    if x is not None and tuple(x.shape) != want:
      raise ValueError(f"`{name}` must have shape {want}, got "
                       f"{tuple(x.shape)} ({shapes}).")
  if pool_bias is not None:
    try:
      np.broadcast_shapes(tuple(pool_bias.shape), (b, n, s, p))
      ok = pool_bias.ndim <= 4
    except ValueError:
      ok = False
    if not ok:
      raise ValueError(f"`pool_bias` must broadcast to [B, N, H*W, P]="
                       f"{(b, n, s, p)}, got {tuple(pool_bias.shape)}.")
  if key_mask is not None and (tuple(key_mask.shape) != q.shape[:3]
                               or key_mask.dtype != jnp.bool_):
    raise ValueError(f"`key_mask` must be bool [B, H, W]={q.shape[:3]}, got "
                     f"{tuple(key_mask.shape)} {key_mask.dtype}.")


def _local_counts(h, w, r):
  """Number of in-image neighbours in the (2r+1)^2 window, [H, W]."""
  cy = np.minimum(np.arange(h) + r, h - 1) - np.maximum(np.arange(h) - r, 0) + 1
  cx = np.minimum(np.arange(w) + r, w - 1) - np.maximum(np.arange(w) - r, 0) + 1
  return (cy[:, None] * cx[None]).astype(np.float32)


def _q_scaled(q, qe, temp, p, r):
  qn = _l2n(q)
  qs = qn if qe is None else qn + qe.astype(jnp.float32)
  if temp is not None:
    qs = qs * temp.astype(jnp.float32)[:, None]
  ls = np.log(_local_counts(q.shape[1], q.shape[2], r) + p)
  return qn, qs * jnp.asarray(ls)[None, :, :, None, None]


def _xla(config, q, k, v, kp, vp, *, window_size, query_embedding,
         temperature, local_bias, pool_bias, learnable_tokens, learnable_bias,
         key_mask):
  del config
  b, h, w, n, d = q.shape
  r, p = window_size // 2, kp.shape[1]
  kk = window_size * window_size
  if key_mask is not None:
    km = key_mask[..., None, None]
    k, v = jnp.where(km, k, 0), jnp.where(km, v, 0)
  qn, qs = _q_scaled(q, query_embedding, temperature, p, r)
  valid = jnp.ones((b, h, w), bool) if key_mask is None else key_mask
  pads = [(0, 0), (r, r), (r, r)]

  def unfold(x):        # [B, H, W, ...] -> [B, H, W, ..., k*k] (offset order)
    x = jnp.pad(x, pads + [(0, 0)] * (x.ndim - 3))
    return jnp.stack([x[:, i:i + h, j:j + w] for i in range(window_size)
                      for j in range(window_size)], -1)

  kl, vl, okl = unfold(_l2n(k)), unfold(v), unfold(valid)   # okl [B,H,W,kk]
  logit_l = jnp.einsum("byxnd,byxndj->bnyxj", qs, kl)
  if local_bias is not None:
    logit_l = logit_l + local_bias.astype(jnp.float32)[None, :, None, None]
  logit_p = jnp.einsum("byxnd,bpnd->bnyxp", qs, _l2n(kp))
  if pool_bias is not None:
    pb = jnp.broadcast_to(pool_bias.astype(jnp.float32), (b, n, h * w, p))
    logit_p = logit_p + pb.reshape(b, n, h, w, p)
  ok = jnp.concatenate([okl[:, None], jnp.ones((b, 1, h, w, p), bool)], -1)
  probs = masked_softmax(jnp.concatenate([logit_l, logit_p], -1), ok)
  pl, pp = probs[..., :kk], probs[..., kk:]
  if learnable_tokens is not None:
    pl = pl + jnp.einsum("byxnd,ndj->bnyxj", qn,
                         learnable_tokens.astype(jnp.float32))
  if learnable_bias is not None:
    pl = pl + learnable_bias.astype(jnp.float32)[None, :, None, None]
  out = jnp.einsum("bnyxj,byxnej->byxne", pl.astype(v.dtype), vl,
                   preferred_element_type=jnp.float32)
  out = out + jnp.einsum("bnyxp,bpne->byxne", pp.astype(vp.dtype), vp,
                         preferred_element_type=jnp.float32)
  return out.astype(q.dtype)


AGGREGATED_ATTENTION.register("xla", _xla)


def aggregated_attention(query, key, value, key_pool, value_pool,
                         window_size: int = 3, *, query_embedding=None,
                         temperature=None, local_bias=None, pool_bias=None,
                         learnable_tokens=None, learnable_bias=None,
                         key_mask=None, implementation=None):
  """TransNeXt aggregated (pixel-focused) attention.

  Args:
    query, key: [B, H, W, N, Hd]; value [B, H, W, N, Hv].
    key_pool: [B, P, N, Hd]; value_pool [B, P, N, Hv] (coarse tokens).
    window_size: odd k of the sliding window.
    query_embedding: [N, Hd] added to the normalized query.
    temperature: [N] positive multiplier (TransNeXt: softplus(param)).
    local_bias: [N, k*k], per window offset (row-major (dy, dx)).
    pool_bias: broadcastable to [B, N, H*W, P].
    learnable_tokens: [N, Hd, k*k]; learnable_bias [N, k*k].
    key_mask: bool [B, H, W] for the local keys.
    implementation: dispatch (`AGGREGATED_ATTENTION`: 'xla').
  Returns: [B, H, W, N, Hv] in query.dtype.
  """
  _check(query, key, value, key_pool, value_pool, window_size,
         query_embedding, temperature, local_bias, pool_bias,
         learnable_tokens, learnable_bias, key_mask)
  return AGGREGATED_ATTENTION(
      implementation, query, key, value, key_pool, value_pool,
      window_size=int(window_size), query_embedding=query_embedding,
      temperature=temperature, local_bias=local_bias, pool_bias=pool_bias,
      learnable_tokens=learnable_tokens, learnable_bias=learnable_bias,
      key_mask=key_mask)


def aggregated_attention_reference(query, key, value, key_pool, value_pool,
                                   window_size: int = 3, *,
                                   query_embedding=None, temperature=None,
                                   local_bias=None, pool_bias=None,
                                   learnable_tokens=None, learnable_bias=None,
                                   key_mask=None):
  """Dense over [all pixels + pooled tokens]: the window mask, offsets and
  neighbour counts come from pixel coordinates (materializes [S, S + P])."""
  _check(query, key, value, key_pool, value_pool, window_size,
         query_embedding, temperature, local_bias, pool_bias,
         learnable_tokens, learnable_bias, key_mask)
  b, h, w, n, d = query.shape
  p, r = key_pool.shape[1], window_size // 2
  s = h * w
  ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  ys, xs = ys.ravel(), xs.ravel()
  dy, dx = ys[None] - ys[:, None], xs[None] - xs[:, None]   # key - query
  win = (np.abs(dy) <= r) & (np.abs(dx) <= r)
  off = np.clip(dy + r, 0, 2 * r) * window_size + np.clip(dx + r, 0, 2 * r)
  count = win.sum(1).astype(np.float64)
  f32 = lambda x: x.astype(jnp.float32)
  valid = (jnp.ones((b, s), bool) if key_mask is None
           else key_mask.reshape(b, s))
  kf = jnp.where(valid[..., None, None], f32(key).reshape(b, s, n, d), 0)
  vf = jnp.where(valid[..., None, None], f32(value).reshape(b, s, n, -1), 0)
  norm = lambda x: x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True),
                                   1e-12)
  qn = norm(f32(query).reshape(b, s, n, d))
  qs = qn + (0 if query_embedding is None else f32(query_embedding))
  if temperature is not None:
    qs = qs * f32(temperature)[:, None]
  qs = qs * jnp.asarray(np.log(count + p), jnp.float32)[None, :, None, None]
  logits = jnp.concatenate(
      [jnp.einsum("btnd,bsnd->bnts", qs, norm(kf)),
       jnp.einsum("btnd,bpnd->bntp", qs, norm(f32(key_pool)))], -1)
  if local_bias is not None:
    logits = logits.at[..., :s].add(f32(local_bias)[:, off][None])
  if pool_bias is not None:
    logits = logits.at[..., s:].add(f32(pool_bias))
  ok = jnp.concatenate([jnp.asarray(win)[None, None]
                        & valid[:, None, None, :],
                        jnp.ones((b, 1, s, p), bool)], -1)
  pr = masked_softmax(logits, ok)
  wl = pr[..., :s]
  extra = jnp.zeros_like(wl)
  if learnable_tokens is not None:
    t = jnp.einsum("btnd,ndj->bntj", qn, f32(learnable_tokens))
    extra = extra + jnp.take_along_axis(
        t, jnp.broadcast_to(jnp.asarray(off)[None, None], (b, n, s, s)), -1)
  if learnable_bias is not None:
    extra = extra + f32(learnable_bias)[:, off][None]
  wl = wl + jnp.where(jnp.asarray(win)[None, None], extra, 0)
  out = (jnp.einsum("bnts,bsne->btne", wl, vf)
         + jnp.einsum("bntp,bpne->btne", pr[..., s:], f32(value_pool)))
  return out.reshape(b, h, w, n, -1).astype(query.dtype)


def adaptive_avg_pool(x, out_size):
  """torch's adaptive_avg_pool2d on [B, H, W, C]: bin i covers
  [floor(i H / P), ceil((i + 1) H / P))."""
  _, h, w, _ = x.shape
  ph, pw = out_size

  def mat(n, m):
    a = np.zeros((m, n), np.float32)
    for i in range(m):
      lo, hi = (i * n) // m, -(-((i + 1) * n) // m)
      a[i, lo:hi] = 1.0 / (hi - lo)
    return jnp.asarray(a)

  return jnp.einsum("ph,qw,bhwc->bpqc", mat(h, ph), mat(w, pw), x)


def pool_relative_coords(query_size, pool_size, pretrain_size=None):
  """TransNeXt's continuous-bias inputs: (index [H*W, P] into table,
  table [U, 2]) of log-spaced (query - pooled centre) offsets."""
  pretrain_size = pretrain_size or query_size
  ax = []
  for q_len, k_len in zip(query_size, pool_size):
    a = np.arange(q_len, dtype=np.float64)
    centres = np.array([a[(i * q_len) // k_len:-(-((i + 1) * q_len) // k_len)]
                        .mean() for i in range(k_len)])
    ax.append((a, centres))
  (qh, kh), (qw, kw) = ax
  qh, qw = [g.ravel() for g in np.meshgrid(qh, qw, indexing="ij")]
  kh, kw = [g.ravel() for g in np.meshgrid(kh, kw, indexing="ij")]
  rel = np.stack([(qh[:, None] - kh[None]) / max(pretrain_size[0] - 1, 1) * 8,
                  (qw[:, None] - kw[None]) / max(pretrain_size[1] - 1, 1) * 8],
                 -1).reshape(-1, 2)
  table, idx = np.unique(rel, axis=0, return_inverse=True)
  table = np.sign(table) * np.log2(np.abs(table) + 1.0) / np.log2(8.0)
  return idx.reshape(len(qh), len(kh)), table.astype(np.float32)


class AggregatedAttention(HeadGated):
  """TransNeXt's AggregatedAttention on [B, H, W, C].

  Parameters as the official code: `q` Linear(C, C), `kv` Linear(C, 2C)
  (bias=qkv_bias; the same `kv` makes the local and pooled keys/values),
  `sr` 1x1 conv (Linear(C, C)) + GELU + adaptive average pool to
  `pool_size` + LayerNorm(C) for the coarse tokens, `temperature` [N]
  (softplus init 1/0.24), `query_embedding` [N, Hd], `relative_pos_bias_local`
  [N, k^2], `learnable_tokens` [N, Hd, k^2], `learnable_bias` [N, k^2], the
  continuous-bias MLP `cpb_fc1` (2 -> 512) ReLU `cpb_fc2` (512 -> N), and
  `proj` Linear(C, C). The pooled grid is `pool_size` (TransNeXt: input
  resolution // sr_ratio); offsets are normalized by `pretrain_size` (default
  the input size).
  """

  def __init__(self, dim: int, num_heads: int, *, window_size: int = 3,
               pool_size=7, pretrain_size=None, qkv_bias: bool = True,
               dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    if window_size % 2 != 1:
      raise ValueError(f"`window_size` must be odd, got {window_size}.")
    self.dim, self.num_heads = dim, num_heads
    self.head_dim, _ = heads_and_scale(dim, num_heads)
    self.window_size = window_size
    self.pool_size = to_tuple("pool_size", pool_size, 2)
    self.pretrain_size = (None if pretrain_size is None
                          else to_tuple("pretrain_size", pretrain_size, 2))
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    kk = window_size * window_size
    tn = lambda std, shape: nnx.Param(nnx.initializers.truncated_normal(std)(
        rngs.params(), shape, param_dtype))
    self.q = nnx.Linear(dim, dim, use_bias=qkv_bias, **kw)
    self.kv = nnx.Linear(dim, 2 * dim, use_bias=qkv_bias, **kw)
    self.proj = nnx.Linear(dim, dim, **kw)
    self.sr = nnx.Linear(dim, dim, **kw)
    self.norm = nnx.LayerNorm(dim, epsilon=1e-5, **kw)
    self.cpb_fc1 = nnx.Linear(2, 512, **kw)
    self.cpb_fc2 = nnx.Linear(512, num_heads, **kw)
    self.temperature = nnx.Param(jnp.full(
        (num_heads,), math.log(math.expm1(1 / 0.24)), param_dtype))
    self.query_embedding = tn(0.02, (num_heads, self.head_dim))
    self.relative_pos_bias_local = tn(0.0004, (num_heads, kk))
    self.learnable_tokens = tn(0.02, (num_heads, self.head_dim, kk))
    self.learnable_bias = nnx.Param(jnp.zeros((num_heads, kk), param_dtype))

  def pooled_tokens(self, x):
    """[B, H, W, C] -> LayerNorm(pool(GELU(sr(x)))) as [B, P, C]."""
    y = adaptive_avg_pool(jax.nn.gelu(self.sr(x), approximate=False),
                          self.pool_size)
    return self.norm(y.reshape(y.shape[0], -1, y.shape[-1]))

  def pool_bias(self, spatial):
    idx, table = pool_relative_coords(spatial, self.pool_size,
                                      self.pretrain_size)
    t = self.cpb_fc2(jax.nn.relu(self.cpb_fc1(jnp.asarray(table))))   # [U, N]
    return jnp.moveaxis(t[jnp.asarray(idx)], -1, 0)                  # [N, S, P]

  def __call__(self, x, key_mask=None):
    check_channels_last(x, self.dim, 2)
    b, h, w, _ = x.shape
    n, d = self.num_heads, self.head_dim
    q = self.q(x).reshape(b, h, w, n, d)
    kv = self.kv(x).reshape(b, h, w, 2, n, d)
    kvp = self.kv(self.pooled_tokens(x)).reshape(b, -1, 2, n, d)
    out = aggregated_attention(
        q, kv[..., 0, :, :], kv[..., 1, :, :], kvp[:, :, 0], kvp[:, :, 1],
        self.window_size, query_embedding=self.query_embedding[...],
        temperature=jax.nn.softplus(self.temperature[...]),
        local_bias=self.relative_pos_bias_local[...],
        pool_bias=self.pool_bias((h, w))[None],
        learnable_tokens=self.learnable_tokens[...],
        learnable_bias=self.learnable_bias[...], key_mask=key_mask)
    return self.proj(self.gate_heads(out).reshape(x.shape))
