"""Pre-norm transformer pieces: MLP, TransformerBlock, TransformerEncoder."""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax._checks import check_int, check_rate
from attnjax.nn.attention import MultiHeadAttention
from attnjax.positions import PositionEncoding
from attnjax.softmax import dot_product_attention


def _norm(kind: str, dim: int, dtype, param_dtype, rngs):
  if kind == "layernorm":
    return nnx.LayerNorm(dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
  if kind == "rmsnorm":
    return nnx.RMSNorm(dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
  raise ValueError(f"`norm` must be 'layernorm' or 'rmsnorm', got {kind!r}.")


class MLP(nnx.Module):
  """Linear -> activation -> dropout -> Linear -> dropout."""

  def __init__(self, in_features: int, hidden_features: int,
               out_features: Optional[int] = None, *,
               activation: Callable[[jax.Array], jax.Array] = nnx.gelu,
               dropout_rate: float = 0.0, use_bias: bool = True,
               dtype: Optional[Any] = None, param_dtype: Any = jnp.float32,
               rngs: nnx.Rngs):
    in_features = check_int("in_features", in_features, min_value=1)
    hidden_features = check_int("hidden_features", hidden_features,
                                min_value=1)
    out_features = check_int("out_features", out_features, min_value=1,
                             allow_none=True)
    dropout_rate = check_rate("dropout_rate", dropout_rate)
    out_features = in_features if out_features is None else out_features
    self.fc1 = nnx.Linear(in_features, hidden_features, use_bias=use_bias,
                          dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.fc2 = nnx.Linear(hidden_features, out_features, use_bias=use_bias,
                          dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.activation = activation
    self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)

  def __call__(self, x):
    x = self.dropout(self.activation(self.fc1(x)))
    return self.dropout(self.fc2(x))


class TransformerBlock(nnx.Module):
  """Pre-norm block: x + Attn(Norm(x)); x + MLP(Norm(x)).

  `attention_fn`, `num_kv_heads`, `head_dim` and `positions` (e.g.
  `attnjax.Rotary()`) are forwarded to `MultiHeadAttention`; `mlp_dim=0`
  gives an attention-only block.
  """

  def __init__(self, d_model: int, num_heads: int, *,
               mlp_dim: Optional[int] = None,
               num_kv_heads: Optional[int] = None,
               head_dim: Optional[int] = None,
               attention_fn: Callable[..., jax.Array] = dot_product_attention,
               dropout_rate: float = 0.0, attention_dropout_rate: float = 0.0,
               norm: str = "layernorm", use_bias: bool = True,
               activation: Callable[[jax.Array], jax.Array] = nnx.gelu,
               positions: Optional[PositionEncoding] = None,
               dtype: Optional[Any] = None, param_dtype: Any = jnp.float32,
               rngs: nnx.Rngs):
    d_model = check_int("d_model", d_model, min_value=1)
    mlp_dim = check_int("mlp_dim", mlp_dim, min_value=0, allow_none=True)
    dropout_rate = check_rate("dropout_rate", dropout_rate)
    attention_dropout_rate = check_rate("attention_dropout_rate",
                                        attention_dropout_rate)
    mlp_dim = 4 * d_model if mlp_dim is None else mlp_dim
    self.norm1 = _norm(norm, d_model, dtype, param_dtype, rngs)
    self.attn = MultiHeadAttention(
        num_heads, d_model, num_kv_heads=num_kv_heads, head_dim=head_dim,
        attention_fn=attention_fn, dropout_rate=attention_dropout_rate,
        positions=positions, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.drop = nnx.Dropout(dropout_rate, rngs=rngs)
    if mlp_dim > 0:
      self.norm2 = _norm(norm, d_model, dtype, param_dtype, rngs)
      self.mlp = MLP(d_model, mlp_dim, activation=activation,
                     dropout_rate=dropout_rate, use_bias=use_bias, dtype=dtype,
                     param_dtype=param_dtype, rngs=rngs)
    else:
      self.norm2 = None
      self.mlp = None

  def __call__(self, x, *, mask=None, bias=None, is_causal: bool = False,
               sow_weights: bool = False,
               attention_kwargs: Optional[dict] = None):
    h = self.attn(self.norm1(x), mask=mask, bias=bias, is_causal=is_causal,
                  sow_weights=sow_weights, attention_kwargs=attention_kwargs)
    x = x + self.drop(h)
    if self.mlp is not None:
      x = x + self.mlp(self.norm2(x))
    return x


class TransformerEncoder(nnx.Module):
  """A stack of `TransformerBlock`s with a final norm.

  Blocks are kept in a Python list (`self.blocks`), so per-layer inspection is
  direct; `**block_kwargs` go to every block.
  """

  def __init__(self, num_layers: int, d_model: int, num_heads: int, *,
               final_norm: bool = True, norm: str = "layernorm",
               rngs: nnx.Rngs, **block_kwargs):
    num_layers = check_int("num_layers", num_layers, min_value=1)
    self.blocks = nnx.List([
        TransformerBlock(d_model, num_heads, norm=norm, rngs=rngs,
                         **block_kwargs) for _ in range(num_layers)
    ])
    self.final_norm = (_norm(norm, d_model, block_kwargs.get("dtype"),
                             block_kwargs.get("param_dtype", jnp.float32), rngs)
                       if final_norm else None)

  def __call__(self, x, *, mask=None, bias=None, is_causal: bool = False,
               sow_weights: bool = False,
               attention_kwargs: Optional[dict] = None):
    for blk in self.blocks:
      x = blk(x, mask=mask, bias=bias, is_causal=is_causal,
              sow_weights=sow_weights, attention_kwargs=attention_kwargs)
    return self.final_norm(x) if self.final_norm is not None else x
