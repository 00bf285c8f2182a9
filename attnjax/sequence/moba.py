"""MoBA: Mixture of Block Attention (Lu et al. 2025).

Keys are split into blocks of `block_size`. Each query token scores every
block by q_i . mean(K_block) (mean-pooled keys, per head), and attends with
softmax to the keys of its `top_k` highest-scoring blocks. The block holding
the query's own position is always selected; with `is_causal`, blocks that
start after the query are excluded and causal masking applies inside the
own block (the paper's setting). Cost O(T top_k block_size H) plus the gate
O(T (S / block_size) H).

Positions are top-left aligned (query i and key i share a position), so the
"own block" also exists in cross attention when i < S.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from attnjax import masks as masks_lib
from attnjax.sequence import _common
from attnjax.sequence._gather import gathered_attention
from attnjax.softmax import dot_product_attention

SUPPORT = {
    "noncausal_self": True, "causal_self": True,
    "noncausal_cross": True, "causal_cross": True,
}


def _check(query, key, value, mask, block_size, top_k, bias, dropout_rate):
  _common.reject("bias", bias, "moba_attention",
                 "only the selected key blocks are gathered.")
  _common.reject("dropout_rate", dropout_rate, "moba_attention",
                 "attention dropout is not implemented for gathered blocks.")
  query, key, value, dims, unbatched = _common.prepare_qkv(query, key, value)
  b, t, n, s, k, h, hv = dims
  block_size = _common.check_positive_int("block_size", block_size)
  top_k = _common.check_positive_int("top_k", top_k)
  kv_mask = _common.key_padding_mask(mask, b, n, t, s,
                                     mechanism="moba_attention",
                                     unbatched=unbatched)
  # Masked slots are zeroed by a select, so NaN/Inf there reaches nothing.
  key = _common.zero_masked(key, kv_mask)
  value = _common.zero_masked(value, kv_mask)
  return query, key, value, dims, unbatched, kv_mask, block_size, top_k


def moba_gate_scores(query, key, block_size: int, *, is_causal: bool,
                     kv_mask=None):
  """Gate scores [B, N, T, nk_blocks] float32: q_i . mean(K_b).

  The own block (index i // block_size) is the largest float32, excluded
  blocks (future ones when causal, blocks without valid keys) the lowest
  (finite sentinels, see _common.NEG / POS).
  """
  b, t, n, h = query.shape
  s, k = key.shape[1], key.shape[2]
  nkb = -(-s // block_size)
  sp = nkb * block_size
  w = (jnp.arange(sp) < s)[None].astype(jnp.float32)
  if kv_mask is not None:
    w = w * jnp.pad(kv_mask, ((0, 0), (0, sp - s))).astype(jnp.float32)
  w = jnp.broadcast_to(w, (b, sp)).reshape(b, nkb, block_size)
  kp = jnp.pad(key.astype(jnp.float32), ((0, 0), (0, sp - s), (0, 0), (0, 0)))
  kp = kp.reshape(b, nkb, block_size, k, h)
  cnt = jnp.sum(w, axis=-1)                                   # [b, nkb]
  kbar = jnp.einsum("bcj,bcjkh->bckh", w, kp) / jnp.maximum(cnt, 1.0)[..., None, None]
  q = query.astype(jnp.float32).reshape(b, t, k, n // k, h)
  scores = jnp.einsum("btkgh,bckh->bkgtc", q, kbar).reshape(b, n, t, nkb)
  blk = jnp.arange(nkb)[None, :]
  pos = jnp.arange(t)[:, None]
  allowed = (cnt > 0)[:, None, None, :]
  if is_causal:
    allowed = allowed & (blk * block_size <= pos)[None, None]
  scores = jnp.where(allowed, scores, _common.NEG)
  own = (blk == pos // block_size)[None] & (cnt > 0)[:, None, :]  # [b, t, nkb]
  return jnp.where(own[:, None], _common.POS, scores)


def moba_attention(query, key, value, *, block_size: int = 64, top_k: int = 3,
                   is_causal: bool = False, scale: Optional[float] = None,
                   mask=None, bias=None, dropout_rate: float = 0.0,
                   dropout_rng=None):
  """Mixture of block attention.

  Args:
    query: [B, T, N, H] (or [T, N, H]); key: [B, S, K, H]; value [B, S, K, Hv].
    block_size: keys per block.
    top_k: blocks per query, own block included (capped at the block count).
    is_causal: MoBA's causal form (default False, as every attention_fn).
    scale: softmax scale; default 1/sqrt(H).
    mask: key-padding mask broadcastable to [B, 1, 1, S].

  Returns:
    [B, T, N, Hv] in query.dtype.
  """
  del dropout_rng
  query, key, value, dims, unbatched, kv_mask, block_size, top_k = _check(
      query, key, value, mask, block_size, top_k, bias, dropout_rate)
  b, t, n, s, k, h, hv = dims
  if (empty := _common.empty_output(dims, query.dtype, unbatched)) is not None:
    return empty
  nkb = -(-s // block_size)
  scores = jax.lax.stop_gradient(
      moba_gate_scores(query, key, block_size, is_causal=is_causal,
                       kv_mask=kv_mask))
  vals, idx = jax.lax.top_k(scores, min(top_k, nkb))          # [b, n, t, top]
  valid = vals > 0.5 * _common.NEG
  out = gathered_attention(
      query, key, value, idx, valid, block_q=1, block_k=block_size,
      scale=_common.default_scale(scale, h), is_causal=is_causal,
      kv_mask=kv_mask)
  return out[0] if unbatched else out


def moba_selected_blocks(query, key, *, block_size: int = 64, top_k: int = 3,
                         is_causal: bool = False, mask=None):
  """Boolean [B, N, T, nk_blocks]: the blocks each query attends to.

  Plain-jnp ranking by sorting (independent of the top_k path used above).
  """
  query, key, _, dims, unbatched, kv_mask, block_size, top_k = _check(
      query, key, key, mask, block_size, top_k, None, 0.0)
  scores = moba_gate_scores(query, key, block_size, is_causal=is_causal,
                            kv_mask=kv_mask)
  rank = jnp.argsort(jnp.argsort(-scores, axis=-1, stable=True), axis=-1)
  sel = (rank < top_k) & (scores > 0.5 * _common.NEG)
  return sel[0] if unbatched else sel


def moba_attention_reference(query, key, value, *, block_size: int = 64,
                             top_k: int = 3, is_causal: bool = False,
                             scale: Optional[float] = None, mask=None):
  """Dense softmax attention with the selected blocks expanded to a mask."""
  sel = moba_selected_blocks(query, key, block_size=block_size, top_k=top_k,
                             is_causal=is_causal, mask=mask)
  block_size = int(block_size)
  s = key.shape[-3]
  dense = jnp.repeat(sel, block_size, axis=-1)[..., :s]
  return dot_product_attention(query, key, value,
                               mask=masks_lib.and_masks(dense, mask),
                               scale=scale, is_causal=is_causal,
                               implementation="xla")
