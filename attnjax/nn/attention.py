"""Flax NNX multi-head attention with a pluggable attention primitive.

`MultiHeadAttention` follows `flax.nnx.MultiHeadAttention`'s calling
convention and parameter layout (query/key/value `LinearGeneral` kernels
`[in, heads, head_dim]`, out kernel `[heads, head_dim, out]`), so weights
transfer one-to-one, with two research-oriented differences:

* `head_dim` is set independently of the width (`qkv_features / num_heads` is
  only the default). The low-rank-bottleneck remedy ("fixed head size",
  Bhojanapalli et al. 2020) is `MultiHeadAttention(num_heads=h,
  in_features=d, head_dim=p)` with p fixed as h grows.
* `attention_fn` is any attnjax primitive `fn(query, key, value, **kwargs)`
  on `[B, T, N, H]` inputs. Only the keywords the call needs are passed
  (`mask`, `bias`, `is_causal`, dropout, and anything given to `__call__`
  as `attention_kwargs`), so mechanisms without masks (e.g.
  `attnjax.linear_attention`) plug in unchanged.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax._checks import check_int, check_rate
from attnjax.softmax import attention_weights, dot_product_attention
from attnjax.softmax._common import input_live

default_kernel_init = nnx.initializers.lecun_normal()


def _is_softmax_attention(fn) -> bool:
  """True for attnjax.dot_product_attention and functools.partials of it."""
  while isinstance(fn, functools.partial):
    fn = fn.func
  return fn is dot_product_attention


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
    attention_fn: the attention primitive.
    dropout_rate: attention-weight dropout passed to attention_fn.
    normalize_qk: LayerNorm (no bias) on queries and keys per head.
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
               deterministic: bool = False,
               normalize_qk: bool = False,
               dtype: Optional[Any] = None,
               param_dtype: Any = jnp.float32,
               kernel_init=default_kernel_init,
               out_kernel_init=None,
               bias_init=nnx.initializers.zeros_init(),
               rngs: nnx.Rngs):
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
    self.num_heads = num_heads
    self.num_kv_heads = num_kv_heads
    self.head_dim = head_dim
    self.in_features = in_features
    self.in_kv_features = in_features if in_kv_features is None else in_kv_features
    self.out_features = in_features if out_features is None else out_features
    self.attention_fn = attention_fn
    self.dropout_rate = dropout_rate
    self.deterministic = deterministic
    use_out_bias = use_bias if use_out_bias is None else use_out_bias

    def proj(fin, heads):
      return nnx.LinearGeneral(fin, (heads, head_dim), axis=-1,
                               use_bias=use_bias, dtype=dtype,
                               param_dtype=param_dtype,
                               kernel_init=kernel_init, bias_init=bias_init,
                               rngs=rngs)

    self.query = proj(in_features, num_heads)
    self.key = proj(self.in_kv_features, num_kv_heads)
    self.value = proj(self.in_kv_features, num_kv_heads)
    self.out = nnx.LinearGeneral(
        (num_heads, head_dim), self.out_features, axis=(-2, -1),
        use_bias=use_out_bias, dtype=dtype, param_dtype=param_dtype,
        kernel_init=out_kernel_init or kernel_init, bias_init=bias_init,
        rngs=rngs)
    if normalize_qk:
      self.query_ln = nnx.LayerNorm(head_dim, use_bias=False, dtype=dtype,
                                    param_dtype=param_dtype, rngs=rngs)
      self.key_ln = nnx.LayerNorm(head_dim, use_bias=False, dtype=dtype,
                                  param_dtype=param_dtype, rngs=rngs)
    else:
      self.query_ln = None
      self.key_ln = None
    self.rngs = rngs.fork() if dropout_rate > 0.0 else None

  def project_qkv(self, inputs_q, inputs_k=None, inputs_v=None):
    """Returns the per-head (query, key, value) the attention_fn receives."""
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
    return q, k, v

  def __call__(self, inputs_q, inputs_k=None, inputs_v=None, *, mask=None,
               bias=None, is_causal: bool = False,
               deterministic: Optional[bool] = None,
               rngs: Optional[nnx.Rngs] = None, sow_weights: bool = False,
               attention_kwargs: Optional[dict] = None):
    kwargs = dict(attention_kwargs or {})
    inputs_k = inputs_q if inputs_k is None else inputs_k
    inputs_v = inputs_k if inputs_v is None else inputs_v
    inputs_k, inputs_v = self._zero_unattended(inputs_q, inputs_k, inputs_v,
                                               mask, is_causal, kwargs)
    q, k, v = self.project_qkv(inputs_q, inputs_k, inputs_v)
    if mask is not None:
      kwargs["mask"] = mask
    if bias is not None:
      kwargs["bias"] = bias
    if is_causal:
      kwargs["is_causal"] = True
    deterministic = self.deterministic if deterministic is None else deterministic
    if self.dropout_rate > 0.0 and not deterministic:
      stream = rngs if rngs is not None else self.rngs
      if stream is None:
        raise ValueError("attention dropout needs `rngs` when not deterministic.")
      kwargs["dropout_rate"] = self.dropout_rate
      kwargs["dropout_rng"] = stream.dropout()
    if sow_weights:
      if not _is_softmax_attention(self.attention_fn):
        raise NotImplementedError(
            "sow_weights records softmax attention weights, but this layer's "
            f"attention_fn ({self.attention_fn!r}) is not "
            "attnjax.dot_product_attention; use the mechanism's own analysis "
            "outputs instead.")
      w_kwargs = {k_: kwargs[k_] for k_ in ("mask", "bias", "is_causal")
                  if k_ in kwargs}
      self.sow(nnx.Intermediate, "attention_weights",
               attention_weights(q, k, **w_kwargs))
    x = self.attention_fn(q, k, v, **kwargs)
    return self.out(x)

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
