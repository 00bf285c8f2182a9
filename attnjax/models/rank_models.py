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
  represents this, H = d / r heads of rank r cannot at one layer.
  Two model families: `PostNormRankEncoder`, the authors' architecture
  (post-norm encoder layers, unit-normalise-times-learned-scale norm, ReLU
  MLP, `width` parallel attention modules averaged, no readout; their
  `encoders.py`), and `RankAttentionNet`, this library's earlier pre-RMSNorm
  residual stack with a linear readout. `rank1_random_heads_mse` is the
  closed-form error of H random rank-1 heads with fitted output weights
  (hard-attention, N -> infinity limit).

Everything is built from `attnjax.nn` layers; nothing here trains.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax.nn import MultiHeadAttention, TransformerEncoder

__all__ = [
    "PostNormRankEncoder", "RankAttentionNet", "UnitScaleNorm",
    "rank1_random_heads_mse", "sample_rank1_heads", "RecallTransformer", "associative_recall_batch",
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


def _uniform_init(bound: float):
  """U(-bound, bound) initializer (PyTorch's default Linear/xavier shapes)."""
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


class UnitScaleNorm(nnx.Module):
  """y = s * x / ||x|| with one learned scalar s (init 1).

  The authors' `MyNormalize` (encoders.py): unlike RMSNorm there is no
  per-feature gain and the output norm is exactly |s| (plus `eps` guards a
  zero input, which the authors' eps=0 does not).
  """

  def __init__(self, *, eps: float = 1e-12):
    self.scale = nnx.Param(jnp.ones((), jnp.float32))
    self.eps = eps

  def __call__(self, x):
    inv = jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + self.eps)
    return self.scale[...] * x * inv


def _dense_attention(q, k, v, **kwargs):
  """Plain softmax attention, [B, T, N, H] layout (no masks).

  The rank-r heads here have H = 1..d features and short sequences, where
  one dense einsum is the cheapest form on CPU; it is the textbook
  definition, so it also serves as its own reference.
  """
  if kwargs:
    raise ValueError(f"_dense_attention takes no options, got {sorted(kwargs)}.")
  s = jnp.einsum("btnh,bsnh->bnts", q, k) * (q.shape[-1] ** -0.5)
  p = jax.nn.softmax(s.astype(jnp.float32), axis=-1).astype(v.dtype)
  return jnp.einsum("bnts,bsnh->btnh", p, v)


class _PostNormLayer(nnx.Module):
  """h <- N1(h + mean_m Attn_m(h)); h <- N2(h + MLP(h)) (post-norm)."""

  def __init__(self, dim: int, rank: int, heads_per_module: int, width: int,
               mlp_dim: int, use_bias: bool, rngs: nnx.Rngs):
    # `width` torch MultiheadAttention(d, heads_per_module) modules whose
    # outputs are averaged == one layer of width * heads_per_module heads of
    # size `rank` whose output projection is scaled by 1 / width. PyTorch
    # init: in_proj xavier-uniform on the stacked [3d, d] weight, bound
    # sqrt(6 / 4d); out_proj U(+-1/sqrt(d)); all attention biases zero.
    self.width = width
    self.attn = MultiHeadAttention(
        width * heads_per_module, dim, head_dim=rank, use_bias=use_bias,
        use_out_bias=False, attention_fn=_dense_attention,
        kernel_init=_uniform_init((6.0 / (4 * dim)) ** 0.5),
        out_kernel_init=_uniform_init(dim ** -0.5), rngs=rngs)
    # The m modules' output biases enter as their mean, outside the 1 / m:
    # one bias here, so Adam moves it at the same rate as theirs.
    self.out_bias = (nnx.Param(jnp.zeros((dim,), jnp.float32)) if use_bias
                     else None)
    self.norm1 = UnitScaleNorm()
    if mlp_dim:
      b1, b2 = dim ** -0.5, mlp_dim ** -0.5
      self.fc1 = nnx.Linear(dim, mlp_dim, use_bias=use_bias,
                            kernel_init=_uniform_init(b1),
                            bias_init=_uniform_init(b1), rngs=rngs)
      self.fc2 = nnx.Linear(mlp_dim, dim, use_bias=use_bias,
                            kernel_init=_uniform_init(b2),
                            bias_init=_uniform_init(b2), rngs=rngs)
      self.norm2 = UnitScaleNorm()
    else:
      self.fc1 = self.fc2 = self.norm2 = None

  def __call__(self, h):
    a = self.attn(h) / self.width
    if self.out_bias is not None:
      a = a + self.out_bias[...]
    h = self.norm1(h + a)
    if self.fc1 is not None:
      h = self.norm2(h + self.fc2(jax.nn.relu(self.fc1(h))))
    return h


class PostNormRankEncoder(nnx.Module):
  """The authors' model (attention-formers `encoders.Encoder`), in NNX.

  Each of `num_layers` layers is a post-norm PyTorch
  `TransformerEncoderLayer` (dropout 0, ReLU MLP of width `mlp_dim`, biases)
  whose LayerNorms are replaced by `UnitScaleNorm` and whose attention is
  the average of `width` independent multi-head attention modules with
  d / rank heads of size `rank` each (`WidenedTransformerEncoderLayer`).
  There is no readout: the last layer's output (norm = its learned scale)
  is the prediction. Initialisation follows PyTorch's defaults.

  Per layer the query-key parameters number rank * d * (width * d / rank)
  = width * d^2, i.e. d^2, d^2.5, d^3 for width 1, sqrt(d), d (the
  authors' "params per layer" axis).
  """

  def __init__(self, dim: int, rank: int, num_layers: int, *,
               width: int = 1, mlp_dim: int = 2048, use_bias: bool = True,
               rngs: nnx.Rngs):
    if dim <= 0 or rank <= 0 or rank > dim or dim % rank:
      raise ValueError(f"`rank` must divide `dim` and lie in [1, dim]; got "
                       f"rank={rank}, dim={dim}.")
    if width < 1 or num_layers < 1:
      raise ValueError(f"`width` and `num_layers` must be >= 1; got "
                       f"width={width}, num_layers={num_layers}.")
    self.dim, self.rank, self.width = dim, rank, width
    self.num_heads = width * (dim // rank)
    self.layers = nnx.List([
        _PostNormLayer(dim, rank, dim // rank, width, mlp_dim, use_bias, rngs)
        for _ in range(num_layers)])

  def __call__(self, x):
    if x.shape[-1] != self.dim:
      raise ValueError(f"`x` last dim must be dim={self.dim}, got shape "
                       f"{x.shape}.")
    for layer in self.layers:
      x = layer(x)
    return x


# ----------------------------------------------------------------------------
# Random rank-1 heads (the authors' random-features curve).
# ----------------------------------------------------------------------------

def sample_rank1_heads(key: jax.Array, num_heads: int, dim: int,
                       coupling: str = "uniform_angle"):
  """(q, k) [H, d] unit vectors of H random rank-1 heads q k^T.

  coupling="uniform_angle": k at angle theta from q with cos(theta) uniform
  on [-1, 1] (the authors' `uniform_construction`); "independent": q and k
  independent uniform on the sphere.
  """
  kq, kk, kt = jax.random.split(key, 3)
  q = sample_sphere(kq, (num_heads,), dim, jnp.float64
                    if jax.config.jax_enable_x64 else jnp.float32)
  e = sample_sphere(kk, (num_heads,), dim, q.dtype)
  if coupling == "independent":
    return q, e
  if coupling != "uniform_angle":
    raise ValueError(f"`coupling` must be 'uniform_angle' or 'independent', "
                     f"got {coupling!r}.")
  e = e - jnp.sum(q * e, -1, keepdims=True) * q
  e = e / jnp.linalg.norm(e, axis=-1, keepdims=True)
  c = jax.random.uniform(kt, (num_heads, 1), q.dtype, -1.0, 1.0)
  return q, c * q + jnp.sqrt(1.0 - c * c) * e


def rank1_random_heads_mse(q, k, ridge: float = 0.0):
  """Best MSE of sum_h a_h sign(<q_h, x>) k_h against the target -x.

  This is a layer of H rank-1 heads q_h k_h^T with values scaled by a_h, in
  the limit N -> infinity and hard attention: head h sends x to the sphere
  point maximising <q_h, x><k_h, y>, i.e. sign(<q_h, x>) k_h, while the
  farthest point tends to -x. With x uniform on S^{d-1}:
    E[sign<q_h,x> sign<q_g,x>] = (2/pi) arcsin<q_h,q_g>,
    E[sign<q,x> x] = c_d q,  c_d = E|x_1| = Gamma(d/2)/(sqrt(pi)Gamma((d+1)/2)),
  so C_hg = (2/pi) arcsin<q_h,q_g> <k_h,k_g>, b_h = -c_d <q_h,k_h>, and the
  optimal a gives MSE = 1 - b^T C^{-1} b (computed in float64 NumPy with an
  optional ridge for conditioning). Inputs: q, k [H, d] unit rows.
  """
  import numpy as np
  from scipy.special import gammaln
  q = np.asarray(q, np.float64)
  k = np.asarray(k, np.float64)
  if q.ndim != 2 or q.shape != k.shape:
    raise ValueError(f"`q` and `k` must both be [H, d]; got {q.shape} and "
                     f"{k.shape}.")
  d = q.shape[1]
  c_d = np.exp(gammaln(d / 2) - gammaln((d + 1) / 2)) / np.sqrt(np.pi)
  cmat = (2 / np.pi) * np.arcsin(np.clip(q @ q.T, -1, 1)) * (k @ k.T)
  b = -c_d * np.sum(q * k, axis=1)
  cmat = cmat + ridge * np.eye(len(b))
  a = np.linalg.lstsq(cmat, b, rcond=1e-12)[0]
  return float(1.0 - 2 * a @ b + a @ (cmat - ridge * np.eye(len(b))) @ a)


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
