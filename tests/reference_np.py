"""Float64 NumPy references, written from the definitions.

Independent of attnjax: plain loops-free NumPy on float64 copies of the inputs,
with gradients derived by hand (not by autodiff).
"""

from __future__ import annotations

import numpy as np


def _f64(x):
  return None if x is None else np.asarray(x, dtype=np.float64)


def allowed_np(t, s, *, mask=None, is_causal=False, window=None,
               q_segment_ids=None, kv_segment_ids=None, q_lengths=None,
               kv_lengths=None, batch=1, heads=1, q_offset=0, kv_offset=0,
               bottom_right=False):
  """Boolean [B, N, T, S] of attendable (query, key) pairs.

  Causal and window masks compare absolute positions: query i is at
  q_offset + i (or i + s - t with `bottom_right`, the last query at the last
  key), key j at kv_offset + j; offsets may be ints or per-batch [B] arrays.
  """
  allowed = np.ones((batch, heads, t, s), dtype=bool)
  i = np.arange(t)[:, None]
  j = np.arange(s)[None, :]
  if mask is not None:
    allowed &= np.broadcast_to(np.asarray(mask, bool), allowed.shape)
  qo = np.broadcast_to(np.asarray(q_offset), (batch,))[:, None, None, None]
  ko = np.broadcast_to(np.asarray(kv_offset), (batch,))[:, None, None, None]
  qpos = i[None, None] + (s - t if bottom_right else qo)     # [B|1,1,T,1]
  kpos = j[None, None] + (0 if bottom_right else ko)         # [B|1,1,1,S]
  if is_causal:
    allowed &= (kpos <= qpos)
  if window is not None:
    left, right = (window, window) if isinstance(window, int) else window
    allowed &= (kpos >= qpos - left) & (kpos <= qpos + right)
  if q_segment_ids is not None:
    qs = np.asarray(q_segment_ids)[:, None, :, None]
    ks = np.asarray(kv_segment_ids)[:, None, None, :]
    allowed &= (qs == ks)
  if q_lengths is not None:
    allowed &= (i[None, None] < np.asarray(q_lengths)[:, None, None, None])
  if kv_lengths is not None:
    allowed &= (j[None, None] < np.asarray(kv_lengths)[:, None, None, None])
  return allowed


def attention_np(q, k, v, bias=None, *, scale=None, dout=None, soft_cap=None,
                 sinks=None, dlse=None, **mask_kw):
  """Softmax attention in float64.

  q [B,T,N,H], k [B,S,K,H], v [B,S,K,Hv]; GQA by repeating kv heads.
  Logits: z = scale * q.k + bias, then cap * tanh(z / cap) when `soft_cap`
  (a -inf z stays -inf); `sinks` [N]: a per-head logit in the denominator
  that carries no value. Returns dict(out, lse, probs, p_sink) and, when
  `dout` (and optionally `dlse` [B, N, T]) is given, the gradients dq, dk,
  dv, dbias, dsinks of sum(out * dout) + sum(lse * dlse), by hand.
  """
  q, k, v, bias = _f64(q), _f64(k), _f64(v), _f64(bias)
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  g = n // kh
  scale = 1.0 / np.sqrt(h) if scale is None else scale
  kr = np.repeat(k, g, axis=2)
  vr = np.repeat(v, g, axis=2)
  z = np.einsum("btnh,bsnh->bnts", q, kr) * scale
  if bias is not None:
    z = z + bias
  dcap = np.ones_like(z)
  if soft_cap is not None:
    with np.errstate(invalid="ignore"):
      th = np.tanh(z / soft_cap)
    logits = np.where(np.isneginf(z), z, soft_cap * th)
    dcap = np.where(np.isneginf(z), 0.0, 1.0 - th * th)
  else:
    logits = z
  allowed = allowed_np(t, s, batch=b, heads=n, **mask_kw)
  masked = np.where(allowed, logits, -np.inf)
  sink = (np.full((1, n, 1, 1), -np.inf) if sinks is None
          else _f64(sinks).reshape(1, n, 1, 1))
  row_max = np.max(masked, axis=-1, keepdims=True, initial=-np.inf)
  m = np.maximum(row_max, sink)
  m = np.where(np.isfinite(m), m, 0.0)
  e = np.where(allowed, np.exp(masked - m), 0.0)
  e_sink = np.exp(sink - m)
  l = e.sum(-1, keepdims=True) + e_sink
  safe_l = np.where(l > 0, l, 1.0)
  p = e / safe_l
  p_sink = np.where(l > 0, e_sink / safe_l, 0.0)        # [B, N, T, 1]
  out = np.einsum("bnts,bsnd->btnd", p, vr)
  lse = np.where(l[..., 0] > 0, (m + np.log(safe_l))[..., 0], -np.inf)
  res = dict(out=out, lse=lse, probs=p, p_sink=p_sink[..., 0])
  if dout is not None:
    do = _f64(dout)
    dl = np.zeros((b, n, t, 1)) if dlse is None else _f64(dlse)[..., None]
    dvr = np.einsum("bnts,btnd->bsnd", p, do)
    dp = np.einsum("btnd,bsnd->bnts", do, vr)
    delta = (dp * p).sum(-1, keepdims=True)      # = <dout, out> per row
    ds = p * (dp - delta + dl)                   # d/d(final logits)
    dz = ds * dcap                               # through the soft cap
    dq = np.einsum("bnts,bsnh->btnh", dz, kr) * scale
    dkr = np.einsum("bnts,btnh->bsnh", dz, q) * scale
    res["dq"] = dq
    res["dk"] = dkr.reshape(b, s, kh, g, h).sum(3)
    res["dv"] = dvr.reshape(b, s, kh, g, -1).sum(3)
    if sinks is not None:
      res["dsinks"] = (p_sink * (dl - delta)).sum(axis=(0, 2, 3))
    if bias is not None:
      db = dz
      # Sum over broadcast dims of the bias.
      bshape = (1,) * (4 - bias.ndim) + bias.shape
      axes = tuple(a for a in range(4) if bshape[a] == 1 and ds.shape[a] != 1)
      db = db.sum(axis=axes, keepdims=True).reshape(bias.shape)
      res["dbias"] = db
  return res
