"""Linear (kernelized) attention: Katharopoulos et al. 2020, chunk-wise causal
form of Lightning Attention-2 (Qin et al. 2024).

With a feature map phi applied to queries and keys,

  out_i = sum_j (phi(q_i) . phi(k_j)) v_j / sum_j phi(q_i) . phi(k_j)

(normalize=True), or `scale * sum_j (phi(q_i) . phi(k_j)) v_j` without the
denominator (normalize=False: the unnormalized "linear transformer" form; with
feature_map="identity" this is softmax-free linear self-attention
`scale * (q k^T) v`). Associativity gives `phi(q_i) (sum_j phi(k_j)^T v_j)`,
so non-causal cost is O(S F Hv + T F Hv): linear in sequence length.

Causal (query i sees keys j <= i, top-left aligned as `jax.nn`): the sequence
is cut into chunks of `chunk_size`; inside a chunk the masked quadratic form
`(phi(Q_c) phi(K_c)^T * tril) V_c` is used, across chunks a recurrent state
`S_c = sum_{chunks < c} phi(K)^T V` (Lightning Attention-2). A scan walks
over groups of chunks (~512 positions) carrying only the state: the groups
are its scanned inputs and each group's output a scanned output, so each
group's features and products stay in cache and the reverse-mode scan also
touches each group once (nothing full-length is carried). Cost
O(L (C + F) F Hv), forward and backward: linear in the padded length L.
`linear_attention_reference` is the obviously-correct cumulative-sum form.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from attnjax._checks import check_implementation, pallas_refuses
from attnjax.sequence import _common

FeatureMap = Union[str, Callable[[jax.Array], jax.Array]]

FEATURE_MAPS = {
    "elu_plus_one": lambda x: jax.nn.elu(x) + 1.0,
    "relu": jax.nn.relu,
    "identity": lambda x: x,
}

DEFAULT_CHUNK_SIZE = 64
_TOKENS_PER_STEP = 512

SUPPORT = {
    "noncausal_self": True,
    "causal_self": True,
    "noncausal_cross": True,
    "causal_cross": True,
}


def resolve_feature_map(feature_map: FeatureMap) -> Callable:
  if callable(feature_map):
    return feature_map
  if isinstance(feature_map, str) and feature_map in FEATURE_MAPS:
    return FEATURE_MAPS[feature_map]
  raise ValueError(
      f"`feature_map` must be one of {sorted(FEATURE_MAPS)} or a callable, got "
      f"{feature_map!r}.")


def _features(query, key, feature_map, kv_mask):
  """float32 phi(q) [B,T,N,F], phi(k) [B,S,K,F] (masked keys zeroed)."""
  phi = resolve_feature_map(feature_map)
  fq = phi(query.astype(jnp.float32)).astype(jnp.float32)
  fk = phi(key.astype(jnp.float32)).astype(jnp.float32)
  if fq.shape[:-1] != query.shape[:-1] or fk.shape[:-1] != key.shape[:-1]:
    raise ValueError(
        "`feature_map` must act on the last axis only: it mapped query "
        f"{query.shape} -> {fq.shape} and key {key.shape} -> {fk.shape}.")
  if fq.shape[-1] != fk.shape[-1]:
    raise ValueError(
        "`feature_map` must give queries and keys the same feature size, got "
        f"{fq.shape[-1]} and {fk.shape[-1]}.")
  if kv_mask is not None:
    fk = jnp.where(kv_mask[:, :, None, None], fk, 0.0)
  return fq, fk


def _finish(num, den, normalize, scale, dtype):
  if normalize:
    ok = den != 0
    out = jnp.where(ok[..., None], num / jnp.where(ok, den, 1.0)[..., None], 0.0)
  else:
    out = num * scale
  return out.astype(dtype)


def _validate(query, key, value, mask, chunk_size, is_causal, bias,
              dropout_rate):
  _common.reject("bias", bias, "linear_attention",
                 "an additive bias on the scores does not factor through the "
                 "feature map.")
  _common.reject("dropout_rate", dropout_rate, "linear_attention",
                 "the attention weights are never materialized.")
  query, key, value, dims, unbatched = _common.prepare_qkv(query, key, value)
  b, t, n, s, k, h, hv = dims
  kv_mask = _common.key_padding_mask(mask, b, n, t, s,
                                     mechanism="linear_attention",
                                     unbatched=unbatched)
  # Masked slots are zeroed by a select, so NaN/Inf there reaches nothing.
  key = _common.zero_masked(key, kv_mask)
  value = _common.zero_masked(value, kv_mask)
  if chunk_size is not None:
    _common.check_positive_int("chunk_size", chunk_size)
  return query, key, value, dims, unbatched, kv_mask


def _log_decay(decay, n, is_causal):
  """`decay` (scalar or [N] in (0, 1]) -> float32 log-decay [N] (<= 0)."""
  if not is_causal:
    raise NotImplementedError(
        "linear_attention's `decay` weights key j by decay**(i - j) for j <= i "
        "(RetNet retention / Lightning Attention-2): it needs is_causal=True.")
  d = jnp.asarray(decay, jnp.float32)
  if d.ndim > 1 or (d.ndim == 1 and d.shape[0] not in (1, n)):
    raise ValueError(
        f"`decay` must be a scalar or have shape [{n}] (one per query head), "
        f"got shape {d.shape}.")
  if not isinstance(decay, jax.core.Tracer):
    dn = np.asarray(decay, np.float64)
    if not np.all((dn > 0) & (dn <= 1)):
      raise ValueError(f"`decay` must lie in (0, 1], got {dn}.")
  return jnp.broadcast_to(jnp.log(d).reshape(-1), (n,))


def _pallas_causal(query, key, value, phi, kv_mask, is_causal, normalize,
                   scale, chunk_size, dims):
  """linear_attention through the Pallas causal chunked kernel."""
  b, t, n, s, k, h, hv = dims
  if not is_causal:
    raise pallas_refuses("linear_attention", "is the causal kernel (the "
                         "non-causal form is two matmuls)")
  if t != s:
    raise pallas_refuses("linear_attention",
                         f"needs q_len == kv_len, got {t} and {s}")
  from pallas_kernels import linear_attention as pallas_linear
  # Features in float32, as the XLA path; padded keys get zero features.
  fq = phi(query.astype(jnp.float32))
  fk = phi(key.astype(jnp.float32))
  if kv_mask is not None:
    fk = jnp.where(kv_mask[:, :, None, None], fk, 0.0)
  fk = jnp.repeat(fk, n // k, axis=2)
  v = jnp.repeat(value, n // k, axis=2)
  out = pallas_linear.causal_linear_attention(
      fq, fk, v.astype(jnp.float32), feature_map="identity",
      normalize=normalize, chunk_size=chunk_size or DEFAULT_CHUNK_SIZE)
  if not normalize:
    out = out * scale
  return out.astype(query.dtype)


def linear_attention(query, key, value, *, feature_map: FeatureMap = "elu_plus_one",
                     is_causal: bool = False, normalize: bool = True,
                     scale: Optional[float] = None,
                     chunk_size: Optional[int] = None, mask=None, bias=None,
                     dropout_rate: float = 0.0, dropout_rng=None,
                     implementation: Optional[str] = None, decay=None):
  """Kernelized linear attention.

  Args:
    query: [B, T, N, H] (or unbatched [T, N, H]).
    key: [B, S, K, H] with N % K == 0 (grouped-query heads share a state).
    value: [B, S, K, Hv].
    feature_map: "elu_plus_one" (default), "relu", "identity", or a callable
      mapping [..., H] -> [..., F] (applied in float32 to queries and keys).
    is_causal: query i sees keys j <= i (top-left aligned).
    normalize: divide by sum_j phi(q_i).phi(k_j) (rows where it is 0 give 0).
      False gives the unnormalized form `scale * phi(Q) phi(K)^T V`.
    scale: multiplies the scores phi(q).phi(k); default 1. It cancels when
      normalize=True.
    chunk_size: chunk length of the causal chunk-wise form (default 64);
      ignored when not causal (the non-causal form needs no chunking).
    mask: optional key-padding mask, bool broadcastable to [B, 1, 1, S]
      (True = attend). Query-dependent masks raise NotImplementedError.
    bias, dropout_rate: accepted for `MultiHeadAttention` compatibility;
      anything but None/0 raises NotImplementedError.
    implementation: None / 'xla' (below) or 'pallas': the causal chunked
      kernel `pallas_kernels.causal_linear_attention` (intra-chunk block
      product + carried state; causal self-attention, T == S, only).
    decay: optional per-head decay lambda in (0, 1], a scalar or [N]
      (causal only): key j is weighted by lambda**(i - j), RetNet's retention
      and Lightning Attention-2's decayed form. Computed tiled: inside a
      chunk the decayed masked quadratic form, across chunks a decayed
      recurrent state (one per query head). 'xla' only.

  Returns:
    [B, T, N, Hv] in query.dtype.
  """
  del dropout_rng
  impl = check_implementation(implementation, "linear_attention")
  query, key, value, dims, unbatched, kv_mask = _validate(
      query, key, value, mask, chunk_size, is_causal, bias, dropout_rate)
  b, t, n, s, k, h, hv = dims
  phi = resolve_feature_map(feature_map)
  _features(query[:, :1], key[:, :1], phi, None)      # validates phi's shapes
  scale = 1.0 if scale is None else float(scale)
  log_decay = None if decay is None else _log_decay(decay, n, is_causal)
  if impl == "pallas" and decay is not None:
    raise pallas_refuses("linear_attention", "has no `decay`")
  if impl == "pallas":
    out = _pallas_causal(query, key, value, phi, kv_mask, is_causal,
                         normalize, scale, chunk_size, dims)
    return out[0] if unbatched else out
  c = chunk_size or DEFAULT_CHUNK_SIZE
  # Work in groups of about _TOKENS_PER_STEP positions (whole chunks when
  # causal), sliced from the inputs inside a loop, so that the feature maps
  # and products of a group stay in cache: memory traffic is one read of the
  # inputs and one write of the output, and time stays linear in length.
  if is_causal:
    c = min(c, max(t, s))
    step = c * max(1, min(_TOKENS_PER_STEP // c, -(-max(t, s) // c)))
    length = _common.round_up(max(t, s), step)
    tq = tk = length
  else:
    step = min(_TOKENS_PER_STEP, max(t, s))
    tq, tk = _common.round_up(t, step), _common.round_up(s, step)
  valid = jnp.arange(tk) < s
  valid = valid[None] if kv_mask is None else valid[None] & jnp.pad(
      kv_mask[:, :tk], ((0, 0), (0, max(0, tk - s))))
  valid = jnp.broadcast_to(valid, (b, tk))
  d = hv + 1 if normalize else hv
  g = n // k
  f = _features(query[:, :1], key[:, :1], phi, None)[0].shape[-1]

  def groups(x, length):
    """[B, L, ...] -> [L // step, B, step, ...] (padded with zeros to L)."""
    x = jnp.pad(x, ((0, 0), (0, length - x.shape[1])) +
                ((0, 0),) * (x.ndim - 2))
    x = x.reshape((b, length // step, step) + x.shape[2:])
    return jnp.moveaxis(x, 1, 0)

  # The loops below scan over groups given as scanned inputs and emit each
  # group's output as a scanned output (nothing full-size is carried), so the
  # reverse-mode loop also touches each group once: forward and backward are
  # both linear in length.
  def key_feats(kg, vg, ok):
    fk = jnp.where(ok[:, :, None, None], phi(kg.astype(jnp.float32)), 0.0)
    vg = jnp.where(ok[:, :, None, None], vg.astype(jnp.float32), 0.0)
    if normalize:
      vg = jnp.concatenate([vg, jnp.ones(vg.shape[:-1] + (1,), vg.dtype)], -1)
    return fk, vg                                   # [b,L,k,f], [b,L,k,d]

  def query_feats(qg):
    fq = phi(qg.astype(jnp.float32))
    return fq.reshape(b, step, k, g, f)

  def finish(nd):                                   # [b,L,k,g,d]
    num, den = (nd[..., :-1], nd[..., -1]) if normalize else (nd, None)
    return _finish(num, den, normalize, scale, query.dtype).reshape(
        b, step, n, hv)

  kx = (groups(key, tk), groups(value, tk), groups(valid, tk))
  if not is_causal:
    def acc_kv(kv, xs):
      fk, vg = key_feats(*xs)
      return kv + jnp.einsum("blkf,blkd->bkfd", fk, vg), None
    kv, _ = jax.lax.scan(acc_kv, jnp.zeros((b, k, f, d), jnp.float32), kx)

    def write(_, qg):
      nd = jnp.einsum("blkgf,bkfd->blkgd", query_feats(qg), kv)
      return None, finish(nd)
    _, out = jax.lax.scan(write, None, groups(query, tq))
  else:
    tril = jnp.tril(jnp.ones((c, c), dtype=bool))
    nch = step // c

    def causal_step(state, xs):
      qg, kg, vg, ok = xs
      fq, (fk, vg) = query_feats(qg), key_feats(kg, vg, ok)
      fq = fq.reshape(b, nch, c, k, g, f)
      fk = fk.reshape(b, nch, c, k, f)
      vg = vg.reshape(b, nch, c, k, d)
      scores = jnp.einsum("bpikgf,bpjkf->bpkgij", fq, fk)
      scores = jnp.where(tril, scores, 0.0)
      nd = jnp.einsum("bpkgij,bpjkd->bpikgd", scores, vg)
      kv = jnp.einsum("bpjkf,bpjkd->bpkfd", fk, vg)
      prev = state[:, None] + jnp.cumsum(kv, axis=1) - kv
      nd = nd + jnp.einsum("bpikgf,bpkfd->bpikgd", fq, prev)
      nd = nd.reshape(b, step, k, g, d)
      return state + jnp.sum(kv, axis=1), finish(nd)

    if log_decay is None:
      _, out = jax.lax.scan(causal_step, jnp.zeros((b, k, f, d), jnp.float32),
                            (groups(query, tq),) + kx)
    else:
      step_fn = _decayed_step(log_decay.reshape(k, g), c, nch, query_feats,
                              key_feats, finish, (b, k, g, f, d))
      _, out = jax.lax.scan(step_fn, jnp.zeros((b, k, g, f, d), jnp.float32),
                            (groups(query, tq),) + kx)
  out = jnp.moveaxis(out, 0, 1).reshape(b, tq, n, hv)
  out = out[:, :t]
  return out[0] if unbatched else out


def _decayed_step(a, c, nch, query_feats, key_feats, finish, shape):
  """Scan step of decayed causal linear attention (Lightning Attention-2).

  `a` [K, G] log-decays; a group holds `nch` chunks of `c` positions; the
  carried state [B, K, G, F, D] is sum_j lambda**(end - j) phi(k_j)^T v_j
  over all keys before the group. Every exponent is <= 0 (no overflow).
  """
  b, k, g, f, d = shape
  i = jnp.arange(c, dtype=jnp.float32)
  diff = i[:, None] - i[None, :]
  # Intra-chunk: lambda**(i - j) for j <= i (local positions), else 0.
  intra = jnp.where(diff >= 0, jnp.exp(jnp.maximum(diff, 0) * a[..., None, None]),
                    0.0)                                      # [k, g, c, c]
  tail = jnp.exp((c - 1 - i) * a[..., None])                  # [k, g, c]
  head = jnp.exp((i + 1) * a[..., None])                      # [k, g, c]
  p = jnp.arange(nch, dtype=jnp.float32)
  pd = p[:, None] - 1 - p[None, :]                            # p - 1 - r
  mix = jnp.where(pd >= 0, jnp.exp(c * jnp.maximum(pd, 0) * a[..., None, None]),
                  0.0)                                        # [k, g, p, r]
  enter = jnp.exp(c * p * a[..., None])                       # [k, g, p]
  last = jnp.exp(c * (nch - 1 - p) * a[..., None])            # [k, g, r]
  through = jnp.exp(c * nch * a)                              # [k, g]

  def step(state, xs):
    qg, kg, vg, ok = xs
    fq, (fk, vg) = query_feats(qg), key_feats(kg, vg, ok)
    fq = fq.reshape(b, nch, c, k, g, f)
    fk = fk.reshape(b, nch, c, k, f)
    vg = vg.reshape(b, nch, c, k, d)
    scores = jnp.einsum("bpikgf,bpjkf->bpkgij", fq, fk) * intra
    nd = jnp.einsum("bpkgij,bpjkd->bpikgd", scores, vg)
    # Chunk states decayed to each chunk's last position.
    kv = jnp.einsum("bpjkf,bpjkd,kgj->bpkgfd", fk, vg, tail)
    prev = (jnp.einsum("kgpr,brkgfd->bpkgfd", mix, kv) +
            jnp.einsum("kgp,bkgfd->bpkgfd", enter, state))
    nd = nd + jnp.einsum("bpikgf,bpkgfd,kgi->bpikgd", fq, prev, head)
    state = (through[None, :, :, None, None] * state +
             jnp.einsum("kgr,brkgfd->bkgfd", last, kv))
    return state, finish(nd.reshape(b, nch * c, k, g, d))

  return step


def linear_attention_reference(query, key, value, *,
                               feature_map: FeatureMap = "elu_plus_one",
                               is_causal: bool = False, normalize: bool = True,
                               scale: Optional[float] = None, mask=None,
                               decay=None):
  """Plain-jnp reference: causal form by cumulative sums of phi(k_j) v_j^T.

  Materializes the per-position state [B, S, K, F, Hv]: use for small tests.
  With `decay`: the explicit decayed causal sum over the [T, S] weights
  phi(q_i).phi(k_j) lambda**(i - j), j <= i.
  """
  query, key, value, dims, unbatched, kv_mask = _validate(
      query, key, value, mask, None, is_causal, None, 0.0)
  b, t, n, s, k, h, hv = dims
  g = n // k
  scale = 1.0 if scale is None else float(scale)
  fq, fk = _features(query, key, feature_map, kv_mask)
  if decay is not None:
    a = _log_decay(decay, n, is_causal)
    diff = (jnp.arange(t)[:, None] - jnp.arange(s)[None, :]).astype(jnp.float32)
    w = jnp.where(diff >= 0, jnp.exp(jnp.maximum(diff, 0) *
                                     a[:, None, None]), 0.0)   # [n, t, s]
    sc = jnp.einsum("btnf,bsnf->bnts", fq, jnp.repeat(fk, g, axis=2)) * w
    v = jnp.repeat(value.astype(jnp.float32), g, axis=2)
    num = jnp.einsum("bnts,bsnd->btnd", sc, v)
    den = jnp.sum(sc, axis=-1).transpose(0, 2, 1)
    out = _finish(num, den, normalize, scale, query.dtype)
    return out[0] if unbatched else out
  f = fq.shape[-1]
  fq = fq.reshape(b, t, k, g, f)
  v = value.astype(jnp.float32)
  outer = fk[..., :, None] * v[..., None, :]            # [b, s, k, f, hv]
  if is_causal:
    states = jnp.cumsum(outer, axis=1)
    zs = jnp.cumsum(fk, axis=1)
    idx = jnp.minimum(jnp.arange(t), s - 1)             # last key seen by i
    states, zs = states[:, idx], zs[:, idx]             # [b, t, k, f, hv]
  else:
    states = jnp.broadcast_to(jnp.sum(outer, axis=1, keepdims=True),
                              (b, t, k, f, hv))
    zs = jnp.broadcast_to(jnp.sum(fk, axis=1, keepdims=True), (b, t, k, f))
  num = jnp.einsum("btkgf,btkfd->btkgd", fq, states)
  den = jnp.einsum("btkgf,btkf->btkg", fq, zs)
  out = _finish(num, den, normalize, scale, query.dtype).reshape(b, t, n, hv)
  return out[0] if unbatched else out
