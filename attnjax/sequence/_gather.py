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

import functools
from typing import Any, NamedTuple, Optional, Tuple

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
  if batch_q_blocks is None:
    # Keep the gathered keys of one map step near 2**22 elements.
    per_block = b * n * top * block_k * max(h, hv, block_q)
    batch_q_blocks = max(1, min(nqb, (1 << 22) // max(per_block, 1)))
  cfg = _Cfg(block_q=block_q, block_k=block_k, scale=scale,
             is_causal=is_causal, window=window, t=t,
             batch_q_blocks=batch_q_blocks, out_dtype=query.dtype)
  # The custom VJP's backward emits every query block's gathered key/value
  # cotangents (nqb * top blocks) and folds them after its loop: worth it
  # while that is a few times the keys (block-sparse, routing, sliding
  # windows: top * T / block_q). Per-token routing (MoBA: block_q=1) would
  # emit top * block_k cotangent rows per query (1.4x the memory and
  # 1.2-1.6x the time of autodiff at T=1024-4096), so it keeps autodiff.
  if nqb * top <= _VJP_MAX_BLOCKS_PER_KEY_BLOCK * nkb:
    out = _gathered(cfg, qb, kb, vb, key_ok, idx_b, valid_b, blocks)
  else:
    out = _gathered_impl(cfg, qb, kb, vb, key_ok, idx_b, valid_b, blocks)
  out = out.transpose(1, 0, 4, 2, 3, 5).reshape(b, tp, n, hv)
  return out[:, :t]


_VJP_MAX_BLOCKS_PER_KEY_BLOCK = 16


class _Cfg(NamedTuple):
  block_q: int
  block_k: int
  scale: float
  is_causal: bool
  window: Optional[Tuple[int, int]]
  t: int                 # true query length
  batch_q_blocks: int
  out_dtype: Any


def _gather_blocks(kb, vb, key_ok, ia):
  """Key/value blocks `ia` [B,K,G,top] of kb/vb [B,K,nkb,bk,H|Hv] and
  their key validity [B,K,G,top,bk]."""
  b, k = kb.shape[:2]
  bidx = jnp.arange(b)[:, None, None, None]
  kidx = jnp.arange(k)[None, :, None, None]
  return kb[bidx, kidx, ia], vb[bidx, kidx, ia], key_ok[bidx, ia]


def _block_attention(cfg, qa, kg, vg, kok, ia, va, a):
  """One query block `a`: qa [B,K,G,bq,H] over its gathered blocks kg/vg
  [B,K,G,top,bk,H|Hv] -> [B,K,G,bq,Hv] (cfg.out_dtype)."""
  b, k, g, top, bk, hv = vg.shape
  bq = cfg.block_q
  logits = jnp.einsum("bkgqh,bkgtch->bkgqtc", qa, kg,
                      preferred_element_type=jnp.float32) * cfg.scale
  # Explicit full-rank broadcasts (jax_numpy_rank_promotion='raise').
  qpos = (a * bq + jnp.arange(bq)).reshape(1, 1, 1, bq, 1, 1)
  kpos = (ia[..., None] * bk +
          jnp.arange(bk).reshape(1, 1, 1, 1, bk))             # [B,K,G,top,bk]
  ok = va[..., None] & kok
  ok = ok[:, :, :, None] & (qpos < cfg.t)                     # [B,K,G,bq,top,bk]
  rel = kpos[:, :, :, None] - qpos                            # j - i
  if cfg.is_causal:
    ok = ok & (rel <= 0)
  if cfg.window is not None:
    ok = ok & (rel >= -cfg.window[0]) & (rel <= cfg.window[1])
  logits = logits.reshape(logits.shape[:4] + (-1,))
  ok = ok.reshape(logits.shape)
  p = _common.masked_softmax(logits, ok)
  vg = vg.reshape(b, k, g, top * bk, hv)
  out = jnp.einsum("bkgqs,bkgsd->bkgqd", p.astype(vg.dtype), vg,
                   preferred_element_type=jnp.float32)
  return out.astype(cfg.out_dtype)


def _gathered_impl(cfg, qb, kb, vb, key_ok, idx_b, valid_b, blocks):
  """lax.map over query blocks; each step gathers its key/value blocks."""
  def one(args):
    qa, ia, va, a = args
    kg, vg, kok = _gather_blocks(kb, vb, key_ok, ia)
    return _block_attention(cfg, qa, kg, vg, kok, ia, va, a)
  return jax.lax.map(one, (qb, idx_b, valid_b, blocks),
                     batch_size=cfg.batch_q_blocks)           # [nqb,B,K,G,bq,Hv]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gathered(cfg, qb, kb, vb, key_ok, idx_b, valid_b, blocks):
  return _gathered_impl(cfg, qb, kb, vb, key_ok, idx_b, valid_b, blocks)


def _gathered_fwd(cfg, qb, kb, vb, key_ok, idx_b, valid_b, blocks):
  out = _gathered_impl(cfg, qb, kb, vb, key_ok, idx_b, valid_b, blocks)
  return out, (qb, kb, vb, key_ok, idx_b, valid_b, blocks)


def _gathered_bwd(cfg, res, dout):
  """Each query block's step regathers its blocks, recomputes its softmax
  and emits the cotangents of its gathered blocks as a mapped output; one
  scatter-add after the loop folds them into dK/dV. (Autodiff of the
  forward's loop instead carried full-size dK/dV accumulators through the
  reverse loop and scatter-added into them at every step: time grew
  faster than the length, issue 22.)"""
  qb, kb, vb, key_ok, idx_b, valid_b, blocks = res

  def one(args):
    qa, ia, va, a, da = args
    kg, vg, kok = _gather_blocks(kb, vb, key_ok, ia)
    _, pull = jax.vjp(
        lambda q_, k_, v_: _block_attention(cfg, q_, k_, v_, kok, ia, va, a),
        qa, kg, vg)
    return pull(da)
  dq, dkg, dvg = jax.lax.map(one, (qb, idx_b, valid_b, blocks, dout),
                             batch_size=cfg.batch_q_blocks)
  b, k = kb.shape[:2]
  bidx = jnp.arange(b)[None, :, None, None, None]
  kidx = jnp.arange(k)[None, None, :, None, None]
  dkb = jnp.zeros(kb.shape, dkg.dtype).at[bidx, kidx, idx_b].add(dkg)
  dvb = jnp.zeros(vb.shape, dvg.dtype).at[bidx, kidx, idx_b].add(dvg)
  return dq, dkb.astype(kb.dtype), dvb.astype(vb.dtype), None, None, None, None


_gathered.defvjp(_gathered_fwd, _gathered_bwd)
