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

import dataclasses
import functools
from typing import Callable, ClassVar, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels._rules import LINEAR_FEATURE_MAPS, divide_or_zero

from attnjax._checks import pallas_refuses
from attnjax._dispatch import BackendConfig, Op
from attnjax.sequence import _common

FeatureMap = Union[str, Callable[[jax.Array], jax.Array]]

# The named feature maps: one table, shared with the kernel.
FEATURE_MAPS = LINEAR_FEATURE_MAPS

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
  """The output from numerator [..., Hv] and denominator [...]: num / den
  (0 where den == 0: the rule `divide_or_zero` the kernel shares), or
  scale * num unnormalized."""
  if normalize:
    out = divide_or_zero(num, den[..., None])
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


@dataclasses.dataclass(frozen=True)
class Xla(BackendConfig):
  """`implementation='xla'`: the chunk-wise scan below (all options)."""
  backend: ClassVar[str] = "xla"


@dataclasses.dataclass(frozen=True)
class Pallas(BackendConfig):
  """`implementation='pallas'`: `pallas_kernels.causal_linear_attention`
  (causal self-attention, T == S, no decay); interpret=None means Pallas
  interpret mode on CPU."""
  backend: ClassVar[str] = "pallas"
  interpret: Optional[bool] = None


class LinearCall(NamedTuple):
  """A validated linear_attention call, as its backends receive it."""
  query: jax.Array            # [B, T, N, H]
  key: jax.Array              # [B, S, K, H] (masked slots zeroed)
  value: jax.Array            # [B, S, K, Hv] (masked slots zeroed)
  kv_mask: Optional[jax.Array]  # [B, S] bool key-padding mask, or None
  phi: Callable               # the feature map
  is_causal: bool
  normalize: bool
  scale: float
  chunk_size: Optional[int]
  log_decay: Optional[jax.Array]  # [N] float32 (<= 0), or None
  dims: tuple                 # (B, T, N, S, K, H, Hv)


# The op: None/'auto' runs 'xla' (the kernel is used when asked for by name
# or config; it has not been measured against the scan on an accelerator).
OP = Op("linear_attention", auto_order=lambda call: ["xla"])


def linear_attention(query, key, value, *, feature_map: FeatureMap = "elu_plus_one",
                     is_causal: bool = False, normalize: bool = True,
                     scale: Optional[float] = None,
                     chunk_size: Optional[int] = None, mask=None, bias=None,
                     dropout_rate: float = 0.0, dropout_rng=None,
                     implementation=None, decay=None):
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
    implementation: None/'auto' (= 'xla'), 'xla' (below), 'pallas' or
      `Pallas(interpret=...)`: the causal chunked kernel
      `pallas_kernels.causal_linear_attention` (intra-chunk block product +
      carried state; causal self-attention, T == S, no decay), or a
      sequence of these tried in order (`attnjax._dispatch`).
    decay: optional per-head decay lambda in (0, 1], a scalar or [N]
      (causal only): key j is weighted by lambda**(i - j), RetNet's retention
      and Lightning Attention-2's decayed form. Computed tiled: inside a
      chunk the decayed masked quadratic form, across chunks a decayed
      recurrent state (one per query head). 'xla' only.

  Returns:
    [B, T, N, Hv] in query.dtype.
  """
  del dropout_rng
  OP.resolve(implementation)            # bad values raise before any work
  query, key, value, dims, unbatched, kv_mask = _validate(
      query, key, value, mask, chunk_size, is_causal, bias, dropout_rate)
  phi = resolve_feature_map(feature_map)
  _features(query[:, :1], key[:, :1], phi, None)      # validates phi's shapes
  log_decay = None if decay is None else _log_decay(decay, dims[2], is_causal)
  if (empty := _common.empty_output(dims, query.dtype, unbatched)) is not None:
    return empty
  call = LinearCall(query, key, value, kv_mask, phi, bool(is_causal),
                    bool(normalize), 1.0 if scale is None else float(scale),
                    chunk_size, log_decay, dims)
  out = OP(implementation, call)
  return out[0] if unbatched else out


def _pallas_backend(config: Optional[Pallas], call: LinearCall):
  """linear_attention through the Pallas causal chunked kernel."""
  b, t, n, s, k, h, hv = call.dims
  if call.log_decay is not None:
    raise pallas_refuses("linear_attention", "has no `decay`")
  if not call.is_causal:
    raise pallas_refuses("linear_attention", "is the causal kernel (the "
                         "non-causal form is two matmuls)")
  if t != s:
    raise pallas_refuses("linear_attention",
                         f"needs q_len == kv_len, got {t} and {s}")
  from pallas_kernels import linear_attention as pallas_linear
  # Features in float32, as the XLA path; padded keys get zero features.
  fq, fk = _features(call.query, call.key, call.phi, call.kv_mask)
  fk = jnp.repeat(fk, n // k, axis=2)
  v = jnp.repeat(call.value, n // k, axis=2)
  # eps=0: the kernel then normalises exactly as `_finish` (divide_or_zero).
  out = pallas_linear.causal_linear_attention(
      fq, fk, v.astype(jnp.float32), feature_map="identity",
      normalize=call.normalize, eps=0.0,
      chunk_size=call.chunk_size or DEFAULT_CHUNK_SIZE,
      interpret=None if config is None else config.interpret)
  if not call.normalize:
    out = out * call.scale
  return out.astype(call.query.dtype)


class _Plan(NamedTuple):
  """Static sizes of the XLA scan: groups of `step` positions (whole chunks
  of `c` when causal), padded lengths tq/tk, feature size f, state width d
  (Hv + 1 with the normaliser's column)."""
  c: int
  step: int
  tq: int
  tk: int
  f: int
  d: int


def _plan(call: LinearCall) -> _Plan:
  """Work in groups of about _TOKENS_PER_STEP positions (whole chunks when
  causal), sliced from the inputs inside a loop, so that the feature maps
  and products of a group stay in cache: memory traffic is one read of the
  inputs and one write of the output, and time stays linear in length."""
  b, t, n, s, k, h, hv = call.dims
  c = call.chunk_size or DEFAULT_CHUNK_SIZE
  if call.is_causal:
    c = min(c, max(t, s))
    step = c * max(1, min(_TOKENS_PER_STEP // c, -(-max(t, s) // c)))
    tq = tk = _common.round_up(max(t, s), step)
  else:
    step = min(_TOKENS_PER_STEP, max(t, s))
    tq, tk = _common.round_up(t, step), _common.round_up(s, step)
  f = _features(call.query[:, :1], call.key[:, :1], call.phi,
                None)[0].shape[-1]
  return _Plan(c, step, tq, tk, f, hv + 1 if call.normalize else hv)


def _xla_backend(config: Optional[Xla], call: LinearCall):
  """The chunk-wise scan (module docstring): non-causal, causal, decayed."""
  del config
  b, t, n, s, k, h, hv = call.dims
  plan = _plan(call)
  step, g = plan.step, n // k
  valid = jnp.arange(plan.tk) < s
  valid = valid[None] if call.kv_mask is None else valid[None] & jnp.pad(
      call.kv_mask[:, :plan.tk], ((0, 0), (0, max(0, plan.tk - s))))
  valid = jnp.broadcast_to(valid, (b, plan.tk))

  def groups(x, length):
    """[B, L, ...] -> [L // step, B, step, ...] (padded with zeros to L)."""
    x = jnp.pad(x, ((0, 0), (0, length - x.shape[1])) +
                ((0, 0),) * (x.ndim - 2))
    x = x.reshape((b, length // step, step) + x.shape[2:])
    return jnp.moveaxis(x, 1, 0)

  # The loops scan over groups given as scanned inputs and emit each
  # group's output as a scanned output (nothing full-size is carried), so
  # the reverse-mode loop also touches each group once: forward and backward
  # are both linear in length. Backward: non-causal, a custom VJP
  # (`_noncausal`); causal, the step is rematerialized (`jax.checkpoint`):
  # the reverse loop keeps only each group's entering state [B, K, (G,) F,
  # D] and recomputes the group's features and products, instead of reading
  # back every intermediate autodiff stacked (issue 22: fwd+bwd 0.68-0.71x
  # the CPU time, ~2.8-3.3 forwards instead of 4.1-4.6; compiled temp at
  # S=16384 10 MiB instead of 164).
  def key_feats(kg, vg, ok):
    fk = jnp.where(ok[:, :, None, None], call.phi(kg.astype(jnp.float32)),
                   0.0)
    vg = jnp.where(ok[:, :, None, None], vg.astype(jnp.float32), 0.0)
    if call.normalize:
      vg = jnp.concatenate([vg, jnp.ones(vg.shape[:-1] + (1,), vg.dtype)], -1)
    return fk, vg                                   # [b,L,k,f], [b,L,k,d]

  def query_feats(qg):
    fq = call.phi(qg.astype(jnp.float32))
    return fq.reshape(b, step, k, g, plan.f)

  def finish(nd):                                   # [b,L,k,g,d]
    num, den = (nd[..., :-1], nd[..., -1]) if call.normalize else (nd, None)
    return _finish(num, den, call.normalize, call.scale,
                   call.query.dtype).reshape(b, step, n, hv)

  qx = groups(call.query, plan.tq)
  kx = (groups(call.key, plan.tk), groups(call.value, plan.tk),
        groups(valid, plan.tk))
  shape = (b, k, g, plan.f, plan.d)
  if not call.is_causal:
    out = _noncausal_scan(qx, kx, query_feats, key_feats, finish, shape)
  elif call.log_decay is None:
    step_fn = _causal_step(plan.c, step // plan.c, query_feats, key_feats,
                           finish, shape)
    _, out = jax.lax.scan(jax.checkpoint(step_fn, prevent_cse=False),
                          jnp.zeros((b, k, plan.f, plan.d), jnp.float32),
                          (qx,) + kx)
  else:
    step_fn = _decayed_step(call.log_decay.reshape(k, g), plan.c,
                            step // plan.c, query_feats, key_feats, finish,
                            shape)
    _, out = jax.lax.scan(jax.checkpoint(step_fn, prevent_cse=False),
                          jnp.zeros(shape, jnp.float32), (qx,) + kx)
  out = jnp.moveaxis(out, 0, 1).reshape(b, plan.tq, n, hv)
  return out[:, :t]


class _NonCausalFns(NamedTuple):
  """The per-group pieces of the non-causal scan (static for custom_vjp)."""
  query_feats: Callable      # qg [b,L,n,h] -> phi(q) [b,L,k,g,f]
  key_feats: Callable        # (kg, vg, ok) -> phi(k) [b,L,k,f], [v, 1] [b,L,k,d]
  finish: Callable           # numerator|denominator [b,L,k,g,d] -> [b,L,n,hv]
  shape: tuple               # (b, k, g, f, d)


def _noncausal_scan(qx, kx, query_feats, key_feats, finish, shape):
  """Accumulate sum_j phi(k_j)^T [v_j, 1] over key groups, then read it
  with every query group (custom VJP below)."""
  return _noncausal(_NonCausalFns(query_feats, key_feats, finish, shape),
                    qx, *kx)


def _kv_state(fns, kg, vg, ok):
  b, k, g, f, d = fns.shape

  def acc_kv(kv, xs):
    fk, vv = fns.key_feats(*xs)
    return kv + jnp.einsum("blkf,blkd->bkfd", fk, vv), None
  kv, _ = jax.lax.scan(acc_kv, jnp.zeros((b, k, f, d), jnp.float32),
                       (kg, vg, ok))
  return kv


def _noncausal_run(fns, qx, kg, vg, ok, keep_nd):
  kv = _kv_state(fns, kg, vg, ok)

  def write(_, qg):
    nd = jnp.einsum("blkgf,bkfd->blkgd", fns.query_feats(qg), kv)
    return None, ((fns.finish(nd), nd) if keep_nd else fns.finish(nd))
  _, out = jax.lax.scan(write, None, qx)
  return out, kv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _noncausal(fns, qx, kg, vg, ok):
  return _noncausal_run(fns, qx, kg, vg, ok, keep_nd=False)[0]


def _noncausal_fwd(fns, qx, kg, vg, ok):
  (out, nd), kv = _noncausal_run(fns, qx, kg, vg, ok, keep_nd=True)
  return out, (qx, kg, vg, ok, kv, nd)


def _noncausal_bwd(fns, res, dout):
  """Two scans, each touching a group once: over query groups, the
  numerator|denominator cotangent gives dq and sum_i phi(q_i)^T d(nd)_i =
  d(state); over key groups, d(state) gives dk and dv. The features are
  recomputed per group (elementwise), the products are the four of the
  plain backward: no residual per key group and none of autodiff's
  stacked intermediates, so fwd+bwd costs about 3 forwards."""
  qx, kg, vg, ok, kv, nd = res

  def q_step(dkv, xs):
    qg, ndg, dog = xs
    fq, phi_pull = jax.vjp(fns.query_feats, qg)
    _, fin_pull = jax.vjp(fns.finish, ndg)
    dnd, = fin_pull(dog)
    dkv = dkv + jnp.einsum("blkgf,blkgd->bkfd", fq, dnd)
    dqg, = phi_pull(jnp.einsum("blkgd,bkfd->blkgf", dnd, kv))
    return dkv, dqg
  dkv, dqx = jax.lax.scan(q_step, jnp.zeros_like(kv), (qx, nd, dout))

  def k_step(_, xs):
    kgi, vgi, oki = xs
    (fk, vv), pull = jax.vjp(lambda a, c: fns.key_feats(a, c, oki), kgi, vgi)
    dfk = jnp.einsum("blkd,bkfd->blkf", vv, dkv)
    dvv = jnp.einsum("blkf,bkfd->blkd", fk, dkv)
    return None, pull((dfk, dvv))
  _, (dkx, dvx) = jax.lax.scan(k_step, None, (kg, vg, ok))
  return dqx, dkx, dvx, None


_noncausal.defvjp(_noncausal_fwd, _noncausal_bwd)


def _chunk_feats(xs, query_feats, key_feats, shape, nch, c):
  """A scanned group's features cut into `nch` chunks of `c` positions:
  phi(q) [B, P, C, K, G, F], phi(k) [B, P, C, K, F], [v, 1] [B, P, C, K, D]."""
  b, k, g, f, d = shape
  qg, kg, vg, ok = xs
  fq, (fk, vg) = query_feats(qg), key_feats(kg, vg, ok)
  return (fq.reshape(b, nch, c, k, g, f), fk.reshape(b, nch, c, k, f),
          vg.reshape(b, nch, c, k, d))


def _causal_step(c, nch, query_feats, key_feats, finish, shape):
  """Scan step of causal linear attention (Lightning Attention-2): a group
  of `nch` chunks of `c` positions; masked quadratic form inside a chunk,
  the carried state [B, K, F, D] across chunks."""
  b, k, g, f, d = shape
  tril = jnp.tril(jnp.ones((c, c), dtype=bool))

  def step(state, xs):
    fq, fk, vg = _chunk_feats(xs, query_feats, key_feats, shape, nch, c)
    scores = jnp.einsum("bpikgf,bpjkf->bpkgij", fq, fk)
    scores = jnp.where(tril, scores, 0.0)
    nd = jnp.einsum("bpkgij,bpjkd->bpikgd", scores, vg)
    kv = jnp.einsum("bpjkf,bpjkd->bpkfd", fk, vg)
    prev = state[:, None] + jnp.cumsum(kv, axis=1) - kv
    nd = nd + jnp.einsum("bpikgf,bpkfd->bpikgd", fq, prev)
    nd = nd.reshape(b, nch * c, k, g, d)
    return state + jnp.sum(kv, axis=1), finish(nd)

  return step


OP.register("xla", _xla_backend, config_type=Xla)
OP.register("pallas", _pallas_backend, config_type=Pallas)


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
    fq, fk, vg = _chunk_feats(xs, query_feats, key_feats, shape, nch, c)
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
