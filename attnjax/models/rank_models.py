"""Small models and synthetic tasks for the attention-rank studies.

Two theory papers study what the per-head rank of the query-key product buys:

* Bhojanapalli et al., "Low-Rank Bottleneck in Multi-head Attention Models"
  (ICML 2020): with head size d_p < n a head cannot express every n x n
  attention matrix; setting the head size independently of the number of
  heads (``MultiHeadAttention(head_dim=p)``) removes the bottleneck.
  Task here: single-layer associative recall (`associative_recall_batch`,
  `RecallTransformer`).
* Amsel, Yehudai, Bruna, "On the Benefits of Rank in Attention Layers"
  (arXiv 2407.16153): each of N points on the unit sphere must output the
  point farthest from it (`farthest_point_targets`); one full-rank head
  represents this, H = d / r heads of rank r cannot at one layer
  (`RankAttentionNet`).

Everything is built from `attnjax.nn` layers; nothing here trains.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax.nn import TransformerEncoder

__all__ = [
    "RankAttentionNet", "RecallTransformer", "associative_recall_batch",
    "farthest_point_targets", "sample_sphere", "sphere_batch",
]


# ----------------------------------------------------------------------------
# Farthest point on the sphere (Amsel, Yehudai, Bruna 2024).
# ----------------------------------------------------------------------------

def sample_sphere(key: jax.Array, shape, dim: int,
                  dtype=jnp.float32) -> jax.Array:
  """Uniform samples on the unit sphere S^{dim-1}: shape (*shape, dim)."""
  g = jax.random.normal(key, (*tuple(shape), dim), dtype)
  return g / jnp.linalg.norm(g, axis=-1, keepdims=True)


def farthest_point_targets(x: jax.Array) -> jax.Array:
  """For each token x_i of x [..., N, d], the x_j minimising <x_i, x_j>.

  On the unit sphere this is the point farthest from x_i, i.e. the nearest
  neighbour of -x_i among the N points (the paper's target).
  """
  if x.ndim < 2:
    raise ValueError(f"`x` must be [..., N, d], got shape {x.shape}.")
  gram = jnp.einsum("...id,...jd->...ij", x, x)
  idx = jnp.argmin(gram, axis=-1)                       # [..., N]
  return jnp.take_along_axis(x, idx[..., None], axis=-2)


def sphere_batch(key: jax.Array, batch: int, num_points: int, dim: int):
  """(x, y): x [batch, N, d] uniform on the sphere, y its farthest points."""
  x = sample_sphere(key, (batch, num_points), dim)
  return x, farthest_point_targets(x)


class RankAttentionNet(nnx.Module):
  """Stack of attention blocks with H heads of query-key rank r, + readout.

  Block l:  h <- h + MHA_l(RMSNorm(h)) [+ MLP(RMSNorm(h)) if mlp_dim > 0],
  output:   W_out h + b.

  `MultiHeadAttention(num_heads=H, head_dim=rank)` gives each head
  W_Q,h W_K,h^T of rank <= r; with the paper's scaling H = d / r the q/k/v/o
  parameter count (4 d^2 + biases) is the same for every rank. RMSNorm (not
  LayerNorm) is used because inputs lie on the sphere: RMSNorm of a unit
  vector is a rescaling, so no direction information is lost (LayerNorm
  would project out the all-ones direction, putting a floor ~1/d under the
  error of every model).
  """

  def __init__(self, dim: int, rank: int, num_layers: int, *,
               num_heads: Optional[int] = None, mlp_dim: int = 0,
               rngs: nnx.Rngs):
    if dim <= 0 or rank <= 0 or rank > dim:
      raise ValueError(f"`rank` must be in [1, dim]; got rank={rank}, "
                       f"dim={dim}.")
    if num_heads is None:
      if dim % rank:
        raise ValueError(f"`rank` ({rank}) must divide `dim` ({dim}) when "
                         "`num_heads` is not given (H = d / r).")
      num_heads = dim // rank
    self.dim, self.rank, self.num_heads = dim, rank, num_heads
    self.encoder = TransformerEncoder(
        num_layers, dim, num_heads, head_dim=rank, mlp_dim=mlp_dim,
        norm="rmsnorm", final_norm=False, rngs=rngs)
    self.readout = nnx.Linear(dim, dim, rngs=rngs)

  def __call__(self, x):
    if x.shape[-1] != self.dim:
      raise ValueError(f"`x` last dim must be dim={self.dim}, got shape "
                       f"{x.shape}.")
    return self.readout(self.encoder(x))


# ----------------------------------------------------------------------------
# Associative recall (used for the low-rank-bottleneck scaling study).
# ----------------------------------------------------------------------------

def associative_recall_batch(key: jax.Array, batch: int, num_pairs: int,
                             num_keys: int, num_values: int):
  """A batch of single-step associative recall problems.

  Each example holds `num_pairs` (key, value) pairs with distinct keys drawn
  from range(num_keys) and values from range(num_values), plus one query
  key equal to one of the stored keys. The answer is that key's value.

  Returns (keys [B, P] int32, values [B, P] int32, query [B] int32,
  answer [B] int32).
  """
  if num_pairs > num_keys:
    raise ValueError(f"`num_pairs` ({num_pairs}) must be <= `num_keys` "
                     f"({num_keys}) (keys are distinct).")
  kk, kv, kq = jax.random.split(key, 3)
  keys = jax.vmap(lambda k: jax.random.permutation(k, num_keys)[:num_pairs])(
      jax.random.split(kk, batch)).astype(jnp.int32)
  values = jax.random.randint(kv, (batch, num_pairs), 0, num_values,
                              dtype=jnp.int32)
  pos = jax.random.randint(kq, (batch,), 0, num_pairs)
  query = jnp.take_along_axis(keys, pos[:, None], axis=1)[:, 0]
  answer = jnp.take_along_axis(values, pos[:, None], axis=1)[:, 0]
  return keys, values, query, answer


class RecallTransformer(nnx.Module):
  """Transformer for associative recall with a chosen head size.

  Token i < P is the pair (key_i, value_i) embedded as E_k[key_i] +
  E_v[value_i]; the last token is the query E_k[query] + e_query. No
  positions are needed (the task is permutation-invariant). A
  `TransformerEncoder` (pre-norm) runs over the P + 1 tokens and the last
  token's state is decoded to value logits.

  `head_dim=None` is the standard transformer (head size = width / heads);
  an integer fixes the head size independently of the number of heads
  (the Bhojanapalli et al. remedy).
  """

  def __init__(self, *, num_keys: int, num_values: int, width: int,
               num_heads: int, num_layers: int = 1,
               head_dim: Optional[int] = None, mlp_dim: Optional[int] = None,
               rngs: nnx.Rngs):
    if head_dim is None and width % num_heads:
      raise ValueError(f"`width` ({width}) must be divisible by `num_heads` "
                       f"({num_heads}) for the standard head size.")
    self.num_keys, self.num_values, self.width = num_keys, num_values, width
    self.head_dim = width // num_heads if head_dim is None else head_dim
    init = nnx.initializers.normal(1.0)
    self.key_embed = nnx.Embed(num_keys, width, embedding_init=init,
                               rngs=rngs)
    self.value_embed = nnx.Embed(num_values, width, embedding_init=init,
                                 rngs=rngs)
    self.query_marker = nnx.Param(init(rngs.params(), (width,)))
    self.encoder = TransformerEncoder(
        num_layers, width, num_heads, head_dim=self.head_dim,
        mlp_dim=4 * width if mlp_dim is None else mlp_dim, rngs=rngs)
    self.readout = nnx.Linear(width, num_values, rngs=rngs)

  def __call__(self, keys, values, query):
    pairs = self.key_embed(keys) + self.value_embed(values)     # [B, P, D]
    q = self.key_embed(query) + self.query_marker[...]           # [B, D]
    h = self.encoder(jnp.concatenate([pairs, q[:, None, :]], axis=1))
    return self.readout(h[:, -1, :])
