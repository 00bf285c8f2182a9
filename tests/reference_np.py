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
               kv_lengths=None, batch=1, heads=1):
  """Boolean [B, N, T, S] of attendable (query, key) pairs."""
  allowed = np.ones((batch, heads, t, s), dtype=bool)
  i = np.arange(t)[:, None]
  j = np.arange(s)[None, :]
  if mask is not None:
    allowed &= np.broadcast_to(np.asarray(mask, bool), allowed.shape)
  if is_causal:
    allowed &= (j <= i)
  if window is not None:
    left, right = (window, window) if isinstance(window, int) else window
    allowed &= (j >= i - left) & (j <= i + right)
  if q_segment_ids is not None:
    qs = np.asarray(q_segment_ids)[:, None, :, None]
    ks = np.asarray(kv_segment_ids)[:, None, None, :]
    allowed &= (qs == ks)
  if q_lengths is not None:
    allowed &= (i[None, None] < np.asarray(q_lengths)[:, None, None, None])
  if kv_lengths is not None:
    allowed &= (j[None, None] < np.asarray(kv_lengths)[:, None, None, None])
  return allowed


def attention_np(q, k, v, bias=None, *, scale=None, dout=None, **mask_kw):
  """Softmax attention in float64.

  q [B,T,N,H], k [B,S,K,H], v [B,S,K,Hv]; GQA by repeating kv heads.
  Returns dict(out, lse, probs) and, when `dout` is given, the gradients
  dq, dk, dv, dbias of sum(out * dout).
  """
  q, k, v, bias = _f64(q), _f64(k), _f64(v), _f64(bias)
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  g = n // kh
  scale = 1.0 / np.sqrt(h) if scale is None else scale
  kr = np.repeat(k, g, axis=2)
  vr = np.repeat(v, g, axis=2)
  logits = np.einsum("btnh,bsnh->bnts", q, kr) * scale
  if bias is not None:
    logits = logits + bias
  allowed = allowed_np(t, s, batch=b, heads=n, **mask_kw)
  masked = np.where(allowed, logits, -np.inf)
  any_row = allowed.any(-1, keepdims=True)
  m = np.where(any_row, masked.max(-1, keepdims=True), 0.0)
  e = np.where(allowed, np.exp(masked - m), 0.0)
  l = e.sum(-1, keepdims=True)
  p = e / np.where(l > 0, l, 1.0)
  out = np.einsum("bnts,bsnd->btnd", p, vr)
  lse = np.where(any_row[..., 0], (m + np.log(np.where(l > 0, l, 1.0)))[..., 0],
                 -np.inf)
  res = dict(out=out, lse=lse, probs=p)
  if dout is not None:
    do = _f64(dout)
    dvr = np.einsum("bnts,btnd->bsnd", p, do)
    dp = np.einsum("btnd,bsnd->bnts", do, vr)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))
    dq = np.einsum("bnts,bsnh->btnh", ds, kr) * scale
    dkr = np.einsum("bnts,btnh->bsnh", ds, q) * scale
    res["dq"] = dq
    res["dk"] = dkr.reshape(b, s, kh, g, h).sum(3)
    res["dv"] = dvr.reshape(b, s, kh, g, -1).sum(3)
    if bias is not None:
      db = ds
      # Sum over broadcast dims of the bias.
      bshape = (1,) * (4 - bias.ndim) + bias.shape
      axes = tuple(a for a in range(4) if bshape[a] == 1 and ds.shape[a] != 1)
      db = db.sum(axis=axes, keepdims=True).reshape(bias.shape)
      res["dbias"] = db
  return res
