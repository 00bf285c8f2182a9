"""Softmax attention over gathered key blocks: the engine of the sliding-window,
block-sparse, MoBA and bi-level-routing mechanisms.

Queries are cut into blocks of `block_q`; each query block `a` (for each batch
and head) attends to `top` key blocks `idx[b, n, a, :]` of `block_k` keys,
those with `valid` False being skipped. A token-level predicate (causal,
window, key length, key padding) is applied inside the gathered blocks.
Query blocks are processed `batch_q_blocks` at a time (lax.map), so memory is
O(batch_q_blocks * block_q * top * block_k) beyond the inputs and compute is
O(T * top * block_k): linear in sequence length for a fixed `top`.
Indices within a row must be distinct (callers mark duplicates invalid).
"""

from __future__ import annotations

from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from attnjax.sequence import _common


def gathered_attention(query, key, value, idx, valid, *, block_q: int,
                       block_k: int, scale: float, is_causal: bool = False,
                       window: Optional[Tuple[int, int]] = None,
                       kv_mask=None, batch_q_blocks: Optional[int] = None):
  """query [B,T,N,H], key/value [B,S,K,H|Hv]; idx/valid [B|1, N|1, nqb, top].

  Returns [B, T, N, Hv] in query.dtype.
  """
  b, t, n, h = query.shape
  s, k, hv = key.shape[1], key.shape[2], value.shape[-1]
  g = n // k
  nqb = -(-t // block_q)
  nkb = -(-s // block_k)
  top = idx.shape[-1]
  idx = jnp.broadcast_to(idx, (b, n, nqb, top)).astype(jnp.int32)
  valid = jnp.broadcast_to(valid, (b, n, nqb, top))
  idx = jnp.clip(idx, 0, nkb - 1)
  tp, sp = nqb * block_q, nkb * block_k
  q = jnp.pad(query, ((0, 0), (0, tp - t), (0, 0), (0, 0)))
  kp = jnp.pad(key, ((0, 0), (0, sp - s), (0, 0), (0, 0)))
  vp = jnp.pad(value, ((0, 0), (0, sp - s), (0, 0), (0, 0)))
  # [B, K, nkb, bk, H]
  kb = kp.reshape(b, nkb, block_k, k, h).transpose(0, 3, 1, 2, 4)
  vb = vp.reshape(b, nkb, block_k, k, hv).transpose(0, 3, 1, 2, 4)
  key_ok = jnp.arange(sp) < s
  if kv_mask is not None:
    key_ok = key_ok[None] & jnp.pad(kv_mask, ((0, 0), (0, sp - s)))
  else:
    key_ok = jnp.broadcast_to(key_ok[None], (b, sp))
  key_ok = key_ok.reshape(b, nkb, block_k)
  # Per query block inputs, leading axis nqb for lax.map.
  qb = q.reshape(b, nqb, block_q, k, g, h).transpose(1, 0, 3, 4, 2, 5)
  idx_b = idx.reshape(b, k, g, nqb, top).transpose(3, 0, 1, 2, 4)
  valid_b = valid.reshape(b, k, g, nqb, top).transpose(3, 0, 1, 2, 4)
  blocks = jnp.arange(nqb)
  bidx = jnp.arange(b)[:, None, None, None]
  kidx = jnp.arange(k)[None, :, None, None]

  def one(args):
    qa, ia, va, a = args          # qa [B,K,G,bq,H]; ia/va [B,K,G,top]
    kg = kb[bidx, kidx, ia]       # [B,K,G,top,bk,H]
    vg = vb[bidx, kidx, ia]
    logits = jnp.einsum("bkgqh,bkgtch->bkgqtc", qa, kg,
                        preferred_element_type=jnp.float32) * scale
    # Explicit full-rank broadcasts (jax_numpy_rank_promotion='raise').
    qpos = (a * block_q + jnp.arange(block_q)).reshape(
        1, 1, 1, block_q, 1, 1)                               # [..,bq,1,1]
    kpos = (ia[..., None] * block_k +
            jnp.arange(block_k).reshape(1, 1, 1, 1, block_k))  # [B,K,G,top,bk]
    ok = va[..., None] & key_ok[jnp.arange(b)[:, None, None, None], ia]
    ok = ok[:, :, :, None] & (qpos < t)                       # [B,K,G,bq,top,bk]
    rel = kpos[:, :, :, None] - qpos                          # j - i
    if is_causal:
      ok = ok & (rel <= 0)
    if window is not None:
      ok = ok & (rel >= -window[0]) & (rel <= window[1])
    logits = logits.reshape(logits.shape[:4] + (-1,))
    ok = ok.reshape(logits.shape)
    p = _common.masked_softmax(logits, ok)
    vg = vg.reshape(b, k, g, top * block_k, hv)
    out = jnp.einsum("bkgqs,bkgsd->bkgqd", p.astype(value.dtype), vg,
                     preferred_element_type=jnp.float32)
    return out.astype(query.dtype)                            # [B,K,G,bq,Hv]

  if batch_q_blocks is None:
    # Keep the gathered keys of one map step near 2**22 elements.
    per_block = b * n * top * block_k * max(h, hv, block_q)
    batch_q_blocks = max(1, min(nqb, (1 << 22) // max(per_block, 1)))
  out = jax.lax.map(one, (qb, idx_b, valid_b, blocks),
                    batch_size=batch_q_blocks)                # [nqb,B,K,G,bq,Hv]
  out = out.transpose(1, 0, 4, 2, 3, 5).reshape(b, tp, n, hv)
  return out[:, :t]
