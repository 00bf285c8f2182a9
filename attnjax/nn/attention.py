"""Flax NNX multi-head attention with a pluggable attention primitive.

`MultiHeadAttention` follows `flax.nnx.MultiHeadAttention`'s calling
convention and parameter layout (query/key/value `LinearGeneral` kernels
`[in, heads, head_dim]`, out kernel `[heads, head_dim, out]`), so weights
transfer one-to-one, including autoregressive decoding with a KV cache
(`decode=True`, `init_cache(input_shape, dtype)`), `keep_rngs`,
`broadcast_dropout`, `out_bias_init`, `precision` and the dtype-promotion
hooks, float masks (nonzero = attend) and any number of leading batch dims.
Research-oriented differences:

* `head_dim` is set independently of the width (`qkv_features / num_heads` is
  only the default). The low-rank-bottleneck remedy ("fixed head size",
  Bhojanapalli et al. 2020) is `MultiHeadAttention(num_heads=h,
  in_features=d, head_dim=p)` with p fixed as h grows.
* `attention_fn` is any attnjax primitive `fn(query, key, value, **kwargs)`
  on `[B, T, N, H]` inputs. Only the keywords the call needs are passed
  (`mask`, `bias`, `is_causal`, dropout, `precision` when set, and anything
  given to `__call__` as `attention_kwargs`), so mechanisms without masks
  (e.g. `attnjax.linear_attention`) plug in unchanged.
* The attention computation is the method `attend(query, key, value,
  **kwargs)`: subclasses with their own mechanism override it, and a call
  may pass `attention_fn=` to use another function for that call only. A
  layer never reassigns its own attributes during a call.
* `positions=`: `attnjax.positions.Rotary(...)` (RoPE on the projected
  queries/keys, 1D or axial) or `attnjax.positions.ALiBi(mode)` (logit
  bias); positions come from `input_positions` / `kv_positions` (default
  `arange`), and under decoding from the cache index, so RoPE + KV cache
  works.

Decoding (`decode=True` at construction or per call, after `init_cache`):
each call appends its L >= 1 tokens at the cache index; query j of the call
(absolute position i + j, i = cache index before the call) attends the cached
keys 0 .. i + j (causal, bottom-right aligned); `is_causal` is ignored, as in
flax. Writing past the cache raises ValueError when the index is concrete;
under jit the output of such a call is NaN.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax._checks import check_int, check_rate
from attnjax._numerics import gate_heads
from attnjax.positions import PositionEncoding
from attnjax.softmax import attention_weights, dot_product_attention
from attnjax.softmax._common import input_live

default_kernel_init = nnx.initializers.lecun_normal()

# attention_kwargs that hold one entry (or row) per batch element.
_PER_EXAMPLE = ("query_seq_lengths", "key_value_seq_lengths", "q_segment_ids",
                "kv_segment_ids")


def _is_softmax_attention(fn) -> bool:
  """True for attnjax.dot_product_attention and functools.partials of it."""
  while isinstance(fn, functools.partial):
    fn = fn.func
  return fn is dot_product_attention


def _accepts(fn, name: str) -> bool:
  """Whether `fn` takes keyword `name` explicitly."""
  try:
    params = inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return False
  return name in params


def _as_bool_mask(mask):
  """Masks as flax takes them: any dtype, nonzero = attend."""
  if mask is None:
    return None
  mask = jnp.asarray(mask)
  return mask if mask.dtype == jnp.bool_ else mask != 0


def _flatten_batch(x, batch_shape, tail: int):
  """[*batch, *tail] (or broadcastable, with no batch dims) -> [B, *tail]."""
  if x is None:
    return None
  x = jnp.asarray(x)
  if x.ndim <= tail:
    return x
  lead = len(batch_shape)
  x = x.reshape((1,) * max(0, lead + tail - x.ndim) + x.shape)
  x = jnp.broadcast_to(x, tuple(batch_shape) + x.shape[lead:])
  return x.reshape((math.prod(batch_shape),) + x.shape[lead:])


def _shared_dropout_call(fn, q, k, v, kwargs):
  """`fn` with one dropout mask shared by every batch element and head
  (flax's broadcast_dropout): the call is vmapped over batch and heads with
  the same dropout key, so each slice draws the same [T, S] mask."""
  b, t, n, _ = q.shape
  s, kh = k.shape[1], k.shape[2]
  k = jnp.repeat(k, n // kh, axis=2)
  v = jnp.repeat(v, n // kh, axis=2)
  per_head, per_batch, static = {}, {}, {}
  for name, val in kwargs.items():
    if name in ("mask", "bias") and val is not None:
      val = jnp.asarray(val)
      val = val.reshape((1,) * (4 - val.ndim) + val.shape)
      per_head[name] = jnp.broadcast_to(val, (b, n) + val.shape[2:])
    elif name in _PER_EXAMPLE and val is not None:
      per_batch[name] = jnp.asarray(val)
    else:
      static[name] = val

  def one(qs, ks, vs, heads, batch):            # [T, H], [S, H], [S, Hv]
    kw = dict(static)
    kw.update({nm: x[None, None] for nm, x in heads.items()})
    kw.update({nm: x[None] for nm, x in batch.items()})
    return fn(qs[None, :, None], ks[None, :, None], vs[None, :, None],
              **kw)[0, :, 0]

  over_heads = jax.vmap(one, in_axes=(1, 1, 1, 0, None), out_axes=1)
  return jax.vmap(over_heads, in_axes=(0, 0, 0, 0, 0))(q, k, v, per_head,
                                                        per_batch)


class MultiHeadAttention(nnx.Module):
  """Multi-head (GQA-capable) attention layer.

  Args:
    num_heads: query heads N.
    in_features: width of the query input.
    qkv_features: total q/k/v width; head_dim defaults to qkv_features // N.
    out_features: output width (default in_features).
    num_kv_heads: key/value heads K (N % K == 0); default N.
    head_dim: per-head size, independent of the width when given.
    in_kv_features: width of key/value inputs (cross-attention).
    use_bias: biases on the q/k/v projections.
    use_out_bias: bias on the output projection (default: use_bias).
    attention_fn: the attention primitive (called by `attend`).
    dropout_rate: attention-weight dropout passed to attention_fn.
    broadcast_dropout: one dropout mask shared over batch and heads (as
      flax's default); False (attnjax's default) draws independent masks.
      Passed as `broadcast_dropout=True` to an attention function that takes
      it; otherwise the call is vmapped over batch and heads with one
      dropout key.
    deterministic: default of the call's `deterministic` (no dropout).
    decode: default of the call's `decode` (KV-cache decoding).
    positions: a `attnjax.positions.PositionEncoding` (`Rotary`, `ALiBi`).
    normalize_qk: LayerNorm (no bias) on queries and keys per head.
    dtype, param_dtype, precision: of the projections (precision is also
      passed to the attention function when it takes a `precision`
      keyword).
    kernel_init, out_kernel_init, bias_init, out_bias_init: initializers
      (out_* default to the q/k/v ones).
    qkv_promote_dtype, out_promote_dtype, ln_promote_dtype: flax's dtype
      promotion hooks of the projections / query-key LayerNorms.
    rngs: parameter (and dropout) randomness.
    keep_rngs: keep a fork of `rngs` for dropout (as flax); with False a
      call with dropout needs `rngs=`.
  """

  def __init__(self, num_heads: int, in_features: int,
               qkv_features: Optional[int] = None,
               out_features: Optional[int] = None, *,
               num_kv_heads: Optional[int] = None,
               head_dim: Optional[int] = None,
               in_kv_features: Optional[int] = None,
               use_bias: bool = True,
               use_out_bias: Optional[bool] = None,
               attention_fn: Callable[..., jax.Array] = dot_product_attention,
               dropout_rate: float = 0.0,
               broadcast_dropout: bool = False,
               deterministic: bool = False,
               decode: bool = False,
               positions: Optional[PositionEncoding] = None,
               normalize_qk: bool = False,
               dtype: Optional[Any] = None,
               param_dtype: Any = jnp.float32,
               precision: Any = None,
               kernel_init=default_kernel_init,
               out_kernel_init=None,
               bias_init=nnx.initializers.zeros_init(),
               out_bias_init=None,
               qkv_promote_dtype: Optional[Callable] = None,
               out_promote_dtype: Optional[Callable] = None,
               ln_promote_dtype: Optional[Callable] = None,
               rngs: nnx.Rngs,
               keep_rngs: bool = True):
    num_heads = check_int("num_heads", num_heads, min_value=1)
    num_kv_heads = check_int("num_kv_heads", num_kv_heads, min_value=1,
                             allow_none=True)
    in_features = check_int("in_features", in_features, min_value=1)
    qkv_features = check_int("qkv_features", qkv_features, min_value=1,
                             allow_none=True)
    out_features = check_int("out_features", out_features, min_value=1,
                             allow_none=True)
    in_kv_features = check_int("in_kv_features", in_kv_features, min_value=1,
                               allow_none=True)
    head_dim = check_int("head_dim", head_dim, min_value=1, allow_none=True)
    dropout_rate = check_rate("dropout_rate", dropout_rate)
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if num_heads % num_kv_heads:
      raise ValueError(
          f"`num_heads` ({num_heads}) must be a positive multiple of "
          f"`num_kv_heads` ({num_kv_heads}).")
    qkv_features = in_features if qkv_features is None else qkv_features
    if head_dim is None:
      if qkv_features % num_heads:
        raise ValueError(
            f"`qkv_features` ({qkv_features}) must be divisible by `num_heads` "
            f"({num_heads}) unless `head_dim` is given.")
      head_dim = qkv_features // num_heads
    if head_dim <= 0:
      raise ValueError(
          f"`head_dim` must be positive, got {head_dim} (qkv_features="
          f"{qkv_features} // num_heads={num_heads}).")
    if positions is not None and not isinstance(positions, PositionEncoding):
      raise ValueError(
          "`positions` must be an attnjax.positions.PositionEncoding "
          f"(Rotary, ALiBi), got {positions!r}.")
    self.num_heads = num_heads
    self.num_kv_heads = num_kv_heads
    self.head_dim = head_dim
    self.in_features = in_features
    self.in_kv_features = in_features if in_kv_features is None else in_kv_features
    self.out_features = in_features if out_features is None else out_features
    self.attention_fn = attention_fn
    self.dropout_rate = dropout_rate
    self.broadcast_dropout = bool(broadcast_dropout)
    self.deterministic = deterministic
    self.decode = bool(decode)
    self.positions = positions
    self.precision = precision
    use_out_bias = use_bias if use_out_bias is None else use_out_bias

    def promote(fn):
      return {} if fn is None else {"promote_dtype": fn}

    def proj(fin, heads):
      return nnx.LinearGeneral(fin, (heads, head_dim), axis=-1,
                               use_bias=use_bias, dtype=dtype,
                               param_dtype=param_dtype, precision=precision,
                               kernel_init=kernel_init, bias_init=bias_init,
                               rngs=rngs, **promote(qkv_promote_dtype))

    self.query = proj(in_features, num_heads)
    self.key = proj(self.in_kv_features, num_kv_heads)
    self.value = proj(self.in_kv_features, num_kv_heads)
    self.out = nnx.LinearGeneral(
        (num_heads, head_dim), self.out_features, axis=(-2, -1),
        use_bias=use_out_bias, dtype=dtype, param_dtype=param_dtype,
        precision=precision, kernel_init=out_kernel_init or kernel_init,
        bias_init=out_bias_init or bias_init, rngs=rngs,
        **promote(out_promote_dtype))
    if normalize_qk:
      self.query_ln = nnx.LayerNorm(head_dim, use_bias=False, dtype=dtype,
                                    param_dtype=param_dtype, rngs=rngs,
                                    **promote(ln_promote_dtype))
      self.key_ln = nnx.LayerNorm(head_dim, use_bias=False, dtype=dtype,
                                  param_dtype=param_dtype, rngs=rngs,
                                  **promote(ln_promote_dtype))
    else:
      self.query_ln = None
      self.key_ln = None
    # As flax: a fork of the dropout stream (None without dropout).
    self.rngs = (rngs.dropout.fork() if (keep_rngs and dropout_rate > 0.0)
                 else None)
    self.cached_key = nnx.data(None)
    self.cached_value = nnx.data(None)
    self.cache_index = nnx.data(None)
    # Per-head output gates [num_heads] (Michel et al. 2019 head importance
    # and head pruning, attnjax.analysis.head_gates): None = no gate, no
    # cost. Set on a view of the model, never needed for training.
    self.head_gate = nnx.data(None)

  # ------------------------------------------------------------------ hooks

  def attend(self, query, key, value, **kwargs):
    """The attention computation: per-head query [B, T, N, H], key/value
    [B, S, K, H] -> [B, T, N, Hv]. The default calls `self.attention_fn`;
    layers with their own mechanism override this method."""
    return self.attention_fn(query, key, value, **kwargs)

  def _is_softmax(self, attention_fn=None) -> bool:
    """Whether this call computes plain softmax attention."""
    if attention_fn is not None:
      return _is_softmax_attention(attention_fn)
    return (type(self).attend is MultiHeadAttention.attend and
            _is_softmax_attention(self.attention_fn))

  def _positions(self, x, positions, name):
    """[B, L] (or [B, L, A] for A-axis encodings) positions of an input
    [B, L, ...]; default arange(L)."""
    b, length = x.shape[0], x.shape[1]
    axes = getattr(self.positions, "axes", 1)
    tail = (length,) if axes == 1 else (length, axes)
    if positions is None:
      if axes != 1:
        raise ValueError(
            f"`{name}` is required with {axes}-axis positions "
            f"({self.positions!r}): pass [B, L, {axes}] coordinates (e.g. "
            "attnjax.positions.grid_positions(h, w)).")
      return jnp.broadcast_to(jnp.arange(length), (b, length))
    positions = jnp.asarray(positions)
    if (positions.shape[positions.ndim - len(tail):] != tail or
        positions.ndim > len(tail) + 1 or
        (positions.ndim == len(tail) + 1 and positions.shape[0] not in (1, b))):
      raise ValueError(
          f"`{name}` must be [{b}, {', '.join(map(str, tail))}] (or without "
          f"the batch dim) for an input of shape {tuple(x.shape[:2])}, got "
          f"shape {tuple(positions.shape)}.")
    return jnp.broadcast_to(positions, (b,) + tail)

  def project_qkv(self, inputs_q, inputs_k=None, inputs_v=None, *,
                  input_positions=None, kv_positions=None):
    """Returns the per-head (query, key, value) the attention receives
    (projections, query/key LayerNorm, rotary positions)."""
    inputs_k = inputs_q if inputs_k is None else inputs_k
    inputs_v = inputs_k if inputs_v is None else inputs_v
    if inputs_q.shape[-1] != self.in_features:
      raise ValueError(
          f"`inputs_q` last dim must be in_features={self.in_features}, got "
          f"shape {inputs_q.shape}.")
    for name, x in (("inputs_k", inputs_k), ("inputs_v", inputs_v)):
      if x.shape[-1] != self.in_kv_features:
        raise ValueError(
            f"`{name}` last dim must be in_kv_features={self.in_kv_features}, "
            f"got shape {x.shape}.")
    q = self.query(inputs_q)
    k = self.key(inputs_k)
    v = self.value(inputs_v)
    if self.query_ln is not None:
      q = self.query_ln(q)
      k = self.key_ln(k)
    if self.positions is not None and q.ndim == 4:
      qp, kp = self._qk_positions(q, k, input_positions, kv_positions)
      q, k = self.positions.rotate(q, k, qp, kp)
    return q, k, v

  def _qk_positions(self, q, k, input_positions, kv_positions):
    qp = self._positions(q, input_positions, "input_positions")
    if kv_positions is None and input_positions is not None and (
        k.shape[1] == q.shape[1]):
      kv_positions = input_positions
    kp = self._positions(k, kv_positions, "kv_positions")
    return qp, kp

  # ------------------------------------------------------------------- call

  def __call__(self, inputs_q, inputs_k=None, inputs_v=None, *, mask=None,
               bias=None, is_causal: bool = False,
               deterministic: Optional[bool] = None,
               rngs: Optional[nnx.Rngs] = None, sow_weights: bool = False,
               decode: Optional[bool] = None, input_positions=None,
               kv_positions=None,
               attention_fn: Optional[Callable[..., jax.Array]] = None,
               attention_kwargs: Optional[dict] = None):
    """Attention of `inputs_q` [*batch, T, F] over `inputs_k`/`inputs_v`
    [*batch, S, F_kv] (default: self-attention).

    Args:
      mask: bool (or any dtype, nonzero = attend), broadcastable to
        [*batch, N, T, S].
      bias: float logit bias broadcastable to [*batch, N, T, S].
      is_causal: causal mask (ignored when decoding).
      deterministic: no dropout (default: the constructor's).
      rngs: dropout randomness (`nnx.Rngs` or a stream); default the kept one.
      sow_weights: sow the softmax weights as nnx.Intermediate
        "attention_weights" (softmax attention only).
      decode: KV-cache decoding (default: the constructor's).
      input_positions, kv_positions: positions [*batch, T] / [*batch, S]
        for `positions=` (default arange; under decoding the cache
        positions).
      attention_fn: use this function instead of `attend` for this call.
      attention_kwargs: extra keywords for the attention function.
    """
    inputs_k = inputs_q if inputs_k is None else inputs_k
    inputs_v = inputs_k if inputs_v is None else inputs_v
    batch_shape = tuple(inputs_q.shape[:-2])
    if len(batch_shape) != 1:
      flat = functools.partial(_flatten_batch, batch_shape=batch_shape)

      def flat_input(name, x):
        if tuple(x.shape[:-2]) != batch_shape:
          raise ValueError(
              f"`{name}` must have the batch dims {batch_shape} of inputs_q, "
              f"got shape {tuple(x.shape)}.")
        return x.reshape((math.prod(batch_shape),) + tuple(x.shape[-2:]))

      out = self._call(
          flat_input("inputs_q", inputs_q), flat_input("inputs_k", inputs_k),
          flat_input("inputs_v", inputs_v),
          mask=flat(_as_bool_mask(mask), tail=3),
          bias=flat(bias, tail=3), is_causal=is_causal,
          deterministic=deterministic, rngs=rngs, sow_weights=sow_weights,
          decode=decode, input_positions=flat(input_positions, tail=1),
          kv_positions=flat(kv_positions, tail=1), attention_fn=attention_fn,
          attention_kwargs=attention_kwargs)
      return out.reshape(tuple(batch_shape) + out.shape[1:])
    return self._call(
        inputs_q, inputs_k, inputs_v, mask=_as_bool_mask(mask), bias=bias,
        is_causal=is_causal, deterministic=deterministic, rngs=rngs,
        sow_weights=sow_weights, decode=decode,
        input_positions=input_positions, kv_positions=kv_positions,
        attention_fn=attention_fn, attention_kwargs=attention_kwargs)

  def _call(self, inputs_q, inputs_k, inputs_v, *, mask, bias, is_causal,
            deterministic, rngs, sow_weights, decode, input_positions,
            kv_positions, attention_fn, attention_kwargs):
    kwargs = dict(attention_kwargs or {})
    decode = self.decode if decode is None else decode
    if decode:
      q, k, v, mask, bias, ok = self._decode_step(
          inputs_q, inputs_k, inputs_v, mask, bias, input_positions)
      is_causal = False
    else:
      ok = None
      inputs_k, inputs_v = self._zero_unattended(inputs_q, inputs_k, inputs_v,
                                                 mask, is_causal, kwargs)
      q, k, v = self.project_qkv(inputs_q, inputs_k, inputs_v,
                                 input_positions=input_positions,
                                 kv_positions=kv_positions)
      if self.positions is not None:
        qp, kp = self._qk_positions(q, k, input_positions, kv_positions)
        pb = self.positions.bias(self.num_heads, qp, kp)
        if pb is not None:
          bias = pb if bias is None else bias + pb
    if mask is not None:
      kwargs["mask"] = mask
    if bias is not None:
      kwargs["bias"] = bias
    if is_causal:
      kwargs["is_causal"] = True
    if self.precision is not None:
      target = attention_fn
      if target is None and type(self).attend is MultiHeadAttention.attend:
        target = self.attention_fn
      if target is not None and _accepts(target, "precision"):
        kwargs["precision"] = self.precision
    deterministic = self.deterministic if deterministic is None else deterministic
    dropout = self.dropout_rate > 0.0 and not deterministic
    if dropout:
      stream = rngs if rngs is not None else self.rngs
      if stream is None:
        raise ValueError(
            "attention dropout needs `rngs` when not deterministic (this "
            "layer was built with keep_rngs=False).")
      kwargs["dropout_rate"] = self.dropout_rate
      kwargs["dropout_rng"] = (stream.dropout() if isinstance(stream, nnx.Rngs)
                               else stream())
    if sow_weights:
      if not self._is_softmax(attention_fn):
        raise NotImplementedError(
            "sow_weights records softmax attention weights, but this call's "
            "attention is not attnjax.dot_product_attention (attention_fn="
            f"{attention_fn or self.attention_fn!r}, attend of "
            f"{type(self).__name__}); use the mechanism's own analysis "
            "outputs instead.")
      w_kwargs = {k_: kwargs[k_] for k_ in ("mask", "bias", "is_causal")
                  if k_ in kwargs}
      self.sow(nnx.Intermediate, "attention_weights",
               attention_weights(q, k, **w_kwargs))
    fn = self.attend if attention_fn is None else attention_fn
    if dropout and self.broadcast_dropout:
      target = attention_fn
      if target is None and type(self).attend is MultiHeadAttention.attend:
        target = self.attention_fn
      if target is not None and _accepts(target, "broadcast_dropout"):
        x = fn(q, k, v, broadcast_dropout=True, **kwargs)
      else:
        x = _shared_dropout_call(fn, q, k, v, kwargs)
    else:
      x = fn(q, k, v, **kwargs)
    if ok is not None:      # decoding past the cache under jit: NaN, loudly
      x = jnp.where(ok, x, jnp.asarray(jnp.nan, x.dtype))
    # xi_h multiplies head h's output (no-op when head_gate is None)
    return self.out(gate_heads(self.head_gate, self.num_heads, x))

  # ----------------------------------------------------------------- decode

  def init_cache(self, input_shape, dtype: Any = jnp.float32) -> None:
    """Allocates the KV cache for decoding up to `input_shape[-2]` tokens.

    `input_shape` is the shape of a full input [*batch, max_length,
    features] (as flax); the cache holds keys/values [*batch, max_length,
    num_kv_heads, head_dim] in `dtype` and the int32 index of the next
    position. Calling it again resets the cache.
    """
    input_shape = tuple(int(s) for s in input_shape)
    if len(input_shape) < 2 or input_shape[-2] < 1:
      raise ValueError(
          "`input_shape` must be [*batch, max_length, features] with "
          f"max_length >= 1, got {input_shape}.")
    shape = input_shape[:-1] + (self.num_kv_heads, self.head_dim)
    self.cached_key = nnx.Cache(jnp.zeros(shape, dtype))
    self.cached_value = nnx.Cache(jnp.zeros(shape, dtype))
    self.cache_index = nnx.Cache(jnp.array(0, dtype=jnp.int32))

  def _decode_step(self, inputs_q, inputs_k, inputs_v, mask, bias,
                   input_positions):
    if self.cached_key is None:
      raise ValueError(
          "Autoregressive cache not initialized: call `init_cache(input_shape,"
          " dtype)` before decoding.")
    ck = self.cached_key[...]
    cv = self.cached_value[...]
    b = inputs_q.shape[0]
    max_len = ck.shape[-3]
    ck = ck.reshape((-1,) + ck.shape[-3:])
    cv = cv.reshape((-1,) + cv.shape[-3:])
    length = inputs_k.shape[1]
    if ck.shape[0] != b or inputs_q.shape[1] != length:
      raise ValueError(
          f"decoding inputs must be [batch={ck.shape[0]}, L, features] with "
          f"the same L for queries and keys (cache "
          f"{tuple(self.cached_key.shape)}), got inputs_q "
          f"{tuple(inputs_q.shape)} and inputs_k {tuple(inputs_k.shape)}.")
    idx = self.cache_index[...]
    try:
      concrete = int(idx)
    except (jax.errors.ConcretizationTypeError, TypeError):
      concrete = None                       # traced (under jit)
    if concrete is not None and concrete + length > max_len:
      raise ValueError(
          f"decoding {length} token(s) at cache index {concrete} overflows "
          f"the cache of max_length={max_len}; call `init_cache` with a "
          "larger shape.")
    pos = idx + jnp.arange(length, dtype=jnp.int32)
    if input_positions is None and getattr(self.positions, "axes", 1) == 1:
      qp = jnp.broadcast_to(pos, (b, length))
    else:
      qp = self._positions(inputs_q, input_positions, "input_positions")
    # Projections and RoPE at the absolute positions of the new tokens
    # (keys are cached rotated).
    q, k, v = self.project_qkv(inputs_q, inputs_k, inputs_v,
                               input_positions=qp, kv_positions=qp)
    zero = jnp.zeros((), jnp.int32)
    ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype),
                                      (zero, idx, zero, zero))
    cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype),
                                      (zero, idx, zero, zero))
    self.cached_key[...] = ck.reshape(self.cached_key.shape)
    self.cached_value[...] = cv.reshape(self.cached_value.shape)
    self.cache_index[...] = idx + length
    # Query j (absolute position idx + j) sees cached keys 0 .. idx + j.
    keys = jnp.arange(max_len)
    live = keys[None, :] <= pos[:, None]                      # [L, M]
    dmask = jnp.broadcast_to(live, (b, 1, length, max_len))
    mask = dmask if mask is None else jnp.logical_and(mask, dmask)
    if self.positions is not None:
      pb = self.positions.bias(self.num_heads, qp,
                               jnp.broadcast_to(keys, (b, max_len)))
      if pb is not None:
        bias = pb if bias is None else bias + pb
    ok = idx + length <= max_len
    return q, ck.astype(k.dtype), cv.astype(v.dtype), mask, bias, ok

  def set_view(self, deterministic: Optional[bool] = None,
               decode: Optional[bool] = None):
    """Used by `nnx.view(module, deterministic=..., decode=...)`."""
    if deterministic is not None:
      self.deterministic = deterministic
    if decode is not None:
      self.decode = decode

  # --------------------------------------------------------------- analysis

  def _zero_unattended(self, x_q, x_k, x_v, mask, is_causal, kwargs):
    """Zeroes key/value input positions no query may attend (padding past
    `key_value_seq_lengths`, all-False mask columns, ...), so whatever they
    hold (NaN, Inf) reaches neither the output nor any gradient, parameter
    gradients included."""
    if not (getattr(x_q, "ndim", 0) == 3 and getattr(x_k, "ndim", 0) == 3
            and getattr(x_v, "ndim", 0) == 3):
      return x_k, x_v
    keys = ("local_window_size", "query_seq_lengths", "key_value_seq_lengths",
            "q_segment_ids", "kv_segment_ids")
    if mask is None and not is_causal and not any(
        kwargs.get(k_) is not None for k_ in keys):
      return x_k, x_v
    b, t, s = x_q.shape[0], x_q.shape[1], x_k.shape[1]
    try:
      live = input_live(b, t, s, mask=mask, is_causal=is_causal,
                        **{k_: kwargs.get(k_) for k_ in keys})
    except (TypeError, ValueError):
      return x_k, x_v     # let the attention primitive report bad arguments
    if live is None:
      return x_k, x_v
    live = live[:, :, None]
    return (jnp.where(live, x_k, jnp.zeros((), x_k.dtype)),
            jnp.where(live, x_v, jnp.zeros((), x_v.dtype)))

  def merged_matrices(self):
    """Per-head merged matrices for analysis.

    Returns (kq [N, in_q, in_kv], ov [N, in_kv, out]) with
    kq_h = W_Q,h W_K,h^T (scores are x_q^T kq_h x_k, before scaling) and
    ov_h = W_V,h W_O,h (a key token's contribution is x_k^T ov_h).
    Biases are ignored.
    """
    wq = self.query.kernel[...]     # [in, N, H]
    wk = self.key.kernel[...]       # [in_kv, K, H]
    wv = self.value.kernel[...]     # [in_kv, K, Hv]
    wo = self.out.kernel[...]       # [N, H, out]
    rep = self.num_heads // self.num_kv_heads
    wk = jnp.repeat(wk, rep, axis=1)
    wv = jnp.repeat(wv, rep, axis=1)
    kq = jnp.einsum("anh,bnh->nab", wq, wk)
    ov = jnp.einsum("anh,nho->nao", wv, wo)
    return kq, ov
