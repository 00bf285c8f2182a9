"""Causal chunked linear attention as a Pallas kernel.

    o_t = phi(q_t)^T S_t / (phi(q_t)^T z_t),  S_t = sum_{s<=t} phi(k_s) v_s^T,
                                              z_t = sum_{s<=t} phi(k_s)

(normalize=False drops the denominator; a row whose denominator is 0 gives
0: `_rules.divide_or_zero`, the rule `attnjax.linear_attention` uses, so with
the default eps=0 the kernel computes exactly that op's causal form and
`causal_linear_attention_reference` agrees with
`attnjax.sequence.linear_attention_reference`). One program per (batch, head) walks
the sequence in chunks of `chunk_size`: the intra-chunk part is a masked
(lower-triangular) block product, the inter-chunk part reads the carried
state S [Dk, Dv] and z [Dk], which is then updated with the chunk. Work is
O(T C D + T D^2), memory O(D^2) per program; states are float32.

The backward pass (custom_vjp) recomputes through the same chunked
recurrence written in plain jnp (`jax.vjp` of `_chunked_jnp`), so gradients
also use O(T) memory; it is XLA, not a Pallas kernel.
"""

from __future__ import annotations

import functools
import numpy as np
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._rules import (LINEAR_FEATURE_MAPS, divide_or_zero,
                                   round_up)
from pallas_kernels._util import (check_float, check_rank, compiler_params,
                                  resolve_interpret, target_platform)

_FEATURE_MAPS = LINEAR_FEATURE_MAPS


def _kernel(q_ref, k_ref, v_ref, o_ref, *, chunk, normalize, eps):
  tp, dk = q_ref.shape
  dv = v_ref.shape[-1]
  tri = (lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
         >= lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1))

  def body(c, carry):
    s, z = carry
    sl = pl.ds(c * chunk, chunk)
    q = q_ref[sl, :].astype(jnp.float32)
    k = k_ref[sl, :].astype(jnp.float32)
    v = v_ref[sl, :].astype(jnp.float32)
    a = lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                        preferred_element_type=jnp.float32)
    a = jnp.where(tri, a, 0.0)
    num = (lax.dot_general(a, v, (((1,), (0,)), ((), ())),
                           preferred_element_type=jnp.float32)
           + lax.dot_general(q, s, (((1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32))
    if normalize:
      den = (jnp.sum(a, axis=1, keepdims=True)
             + jnp.sum(q * z, axis=1, keepdims=True))
      num = divide_or_zero(num, den + eps)   # no key mass: 0
    o_ref[sl, :] = num.astype(o_ref.dtype)
    s = s + lax.dot_general(k, v, (((0,), (0,)), ((), ())),
                            preferred_element_type=jnp.float32)
    z = z + jnp.sum(k, axis=0, keepdims=True)
    return s, z

  lax.fori_loop(0, tp // chunk, body,
                (jnp.zeros((dk, dv), jnp.float32),
                 jnp.zeros((1, dk), jnp.float32)))


def _pallas_forward(q, k, v, chunk, normalize, eps, interpret):
  """q, k [B, N, Tp, Dk], v [B, N, Tp, Dv] (padded) -> [B, N, Tp, Dv]."""
  b, n, tp, dk = q.shape
  dv = v.shape[-1]
  spec = lambda d: pl.BlockSpec((None, None, tp, d), lambda i, j: (i, j, 0, 0))
  return pl.pallas_call(
      functools.partial(_kernel, chunk=chunk, normalize=normalize, eps=eps),
      out_shape=jax.ShapeDtypeStruct((b, n, tp, dv), v.dtype),
      grid=(b, n), in_specs=[spec(dk), spec(dk), spec(dv)],
      out_specs=spec(dv), interpret=interpret,
      compiler_params=compiler_params(target_platform(), interpret,
                                      grid_rank=2),
      name="causal_linear_attention")(q, k, v)


def _chunked_jnp(q, k, v, chunk, normalize, eps):
  """Same recurrence in plain jnp (lax.scan over chunks): used for the VJP."""
  b, n, tp, dk = q.shape
  dv = v.shape[-1]
  nc = tp // chunk
  f32 = lambda x: x.astype(jnp.float32).reshape(b, n, nc, chunk, -1)
  qc, kc, vc = f32(q), f32(k), f32(v)
  tri = jnp.tril(jnp.ones((chunk, chunk), bool))

  def step(carry, xs):
    s, z = carry
    qi, ki, vi = xs
    a = jnp.where(tri, jnp.einsum("bnqd,bnkd->bnqk", qi, ki), 0.0)
    num = jnp.einsum("bnqk,bnkv->bnqv", a, vi) + jnp.einsum(
        "bnqd,bndv->bnqv", qi, s)
    if normalize:
      den = a.sum(-1) + jnp.einsum("bnqd,bnd->bnq", qi, z)
      num = divide_or_zero(num, den[..., None] + eps)
    s = s + jnp.einsum("bnkd,bnkv->bndv", ki, vi)
    z = z + ki.sum(2)
    return (s, z), num

  move = lambda x: jnp.moveaxis(x, 2, 0)
  _, out = lax.scan(step, (jnp.zeros((b, n, dk, dv), jnp.float32),
                           jnp.zeros((b, n, dk), jnp.float32)),
                    (move(qc), move(kc), move(vc)))
  return jnp.moveaxis(out, 0, 2).reshape(b, n, tp, dv).astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _linear(q, k, v, chunk, normalize, eps, interpret):
  return _pallas_forward(q, k, v, chunk, normalize, eps, interpret)


def _linear_fwd(q, k, v, chunk, normalize, eps, interpret):
  return _pallas_forward(q, k, v, chunk, normalize, eps, interpret), (q, k, v)


def _linear_bwd(chunk, normalize, eps, interpret, res, dout):
  q, k, v = res
  _, vjp = jax.vjp(lambda q, k, v: _chunked_jnp(q, k, v, chunk, normalize,
                                                eps), q, k, v)
  return vjp(dout)


_linear.defvjp(_linear_fwd, _linear_bwd)


def _check(query, key, value, feature_map):
  check_rank("query", query, 4, "[batch, len, heads, key_dim]")
  check_rank("key", key, 4, "[batch, len, heads, key_dim]")
  check_rank("value", value, 4, "[batch, len, heads, value_dim]")
  for nm, x in (("query", query), ("key", key), ("value", value)):
    check_float(nm, x)
  if query.shape != key.shape or value.shape[:3] != query.shape[:3]:
    raise ValueError(
        f"`query` {tuple(query.shape)} and `key` {tuple(key.shape)} must have "
        f"equal shapes and `value` {tuple(value.shape)} the same [batch, len, "
        "heads].")
  if feature_map not in _FEATURE_MAPS and not callable(feature_map):
    raise ValueError(
        f"`feature_map` must be one of {sorted(_FEATURE_MAPS)} or a callable, "
        f"got {feature_map!r}.")
  return _FEATURE_MAPS.get(feature_map, feature_map)


def causal_linear_attention(query, key, value, *,
                            feature_map="elu_plus_one",
                            normalize: bool = True, eps: float = 0.0,
                            chunk_size: int = 64,
                            interpret: Optional[bool] = None):
  """Causal (normalized) linear attention, [B, T, N, D] layout.

  Args:
    query, key: [B, T, N, Dk]; value: [B, T, N, Dv].
    feature_map: 'elu_plus_one' (default), 'relu', 'identity' or a callable,
      applied to query and key.
    normalize: divide by phi(q_t) . sum_{s<=t} phi(k_s) (+ eps, default 0);
      a row whose divisor is exactly 0 (e.g. a zero query) gives 0, as
      `attnjax.linear_attention` (`_rules.divide_or_zero`).
    chunk_size: positions per chunk (rounded to a multiple of 8 and clipped
      to the padded length); T need not be a multiple.
    interpret: Pallas interpret mode; None -> True on CPU.

  Returns [B, T, N, Dv] in value.dtype. Differentiable.
  """
  phi = _check(query, key, value, feature_map)
  if (isinstance(chunk_size, (bool, np.bool_)) or
      not isinstance(chunk_size, (int, np.integer)) or chunk_size <= 0):
    raise ValueError(f"`chunk_size` must be a positive int, got {chunk_size!r}.")
  chunk_size = int(chunk_size)
  if not (isinstance(eps, (int, float, np.integer, np.floating)) and
          not isinstance(eps, bool) and math.isfinite(eps) and eps >= 0):
    raise ValueError(f"`eps` must be a finite number >= 0, got {eps!r}.")
  b, t, n, _ = query.shape
  chunk = min(round_up(chunk_size, 8), round_up(t, 8))
  tp = round_up(t, chunk)
  pad = ((0, 0), (0, tp - t), (0, 0), (0, 0))
  # Padded keys come after every real query (causal), so they never count.
  q = jnp.swapaxes(jnp.pad(phi(query), pad), 1, 2)
  k = jnp.swapaxes(jnp.pad(phi(key), pad), 1, 2)
  v = jnp.swapaxes(jnp.pad(value, pad), 1, 2)
  out = _linear(q, k, v, chunk, bool(normalize), float(eps),
                resolve_interpret(interpret))
  return jnp.swapaxes(out, 1, 2)[:, :t]


def causal_linear_attention_reference(query, key, value, *,
                                      feature_map="elu_plus_one",
                                      normalize: bool = True,
                                      eps: float = 0.0):
  """Quadratic plain-jnp definition (explicit causal [T, T] weights)."""
  phi = _check(query, key, value, feature_map)
  q = phi(query.astype(jnp.float32))
  k = phi(key.astype(jnp.float32))
  t = query.shape[1]
  a = jnp.einsum("btnd,bsnd->bnts", q, k, precision=lax.Precision.HIGHEST)
  a = jnp.where(jnp.tril(jnp.ones((t, t), bool)), a, 0.0)
  out = jnp.einsum("bnts,bsnv->btnv", a, value.astype(jnp.float32),
                   precision=lax.Precision.HIGHEST)
  if normalize:
    out = divide_or_zero(out, jnp.swapaxes(a.sum(-1), 1, 2)[..., None] + eps)
  return out.astype(value.dtype)
