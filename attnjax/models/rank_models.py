"""Small models and synthetic tasks for the attention-rank studies.

Two theory papers study what the per-head rank of the query-key product buys:

* Bhojanapalli et al., "Low-Rank Bottleneck in Multi-head Attention Models"
  (ICML 2020): with head size d_p < n a head cannot express every n x n
  attention matrix; setting the head size independently of the number of
  heads (``MultiHeadAttention(head_dim=p)``) removes the bottleneck.
  Here: `HeadSizeTransformer` (head size independent of the width),
  `head_size_transformer_params` / `matched_width` (parameter matching),
  the full-rank mixing task (`mixing_matrices`, `mixing_batch`) and the
  rank measures `centred_logit_rank`, `effective_rank`.
* Amsel, Yehudai, Bruna, "On the Benefits of Rank in Attention Layers"
  (arXiv 2407.16153): each of N points on the unit sphere must output the
  point farthest from it (`farthest_point_targets`); one full-rank head
  represents this, H = d / r heads of rank r cannot at one layer.
  Two model families: `PostNormRankEncoder`, the authors' architecture
  (post-norm encoder layers, unit-normalise-times-learned-scale norm, ReLU
  MLP, `width` parallel attention modules averaged, no readout; their
  `encoders.py`), and `RankAttentionNet`, this library's earlier pre-RMSNorm
  residual stack with a linear readout. `rank1_heads_attention` is the
  fused softmax attention of many rank-1 heads that `PostNormRankEncoder`
  uses at N <= 16 (same function as the generic einsums, ~1.7-1.9x fewer
  CPU-s per training step). `rank1_random_heads_mse` is the
  closed-form error of H random rank-1 heads with fitted output weights
  (hard-attention, N -> infinity limit).

Built from `attnjax.nn` layers and `attnjax.softmax`; nothing here trains.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax.nn import MultiHeadAttention, TransformerEncoder
from attnjax.softmax import dot_product_attention

__all__ = [
    "PostNormRankEncoder", "RankAttentionNet", "UnitScaleNorm",
    "rank1_heads_attention", "rank1_random_heads_mse", "sample_rank1_heads", "HeadSizeTransformer",
    "head_size_transformer_params", "matched_width", "mixing_matrices",
    "mixing_batch", "centred_logit_rank", "effective_rank",
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


def _vsum(xs, axis):
  """Sums of several same-shape arrays over `axis` as ONE variadic reduce.

  XLA:CPU fuses the elementwise producers of a variadic reduce into it (the
  [.., N, N, ..] operands are never written to memory), while a plain sum
  of a broadcast product is handed to its YNNPACK reduce fusion, which first
  materialises every broadcast operand (measured 2-3x slower here).
  """
  xs = list(xs)
  if len(xs) == 1:
    xs.append(xs[0])          # a 2-operand reduce; the copy is discarded
  zeros = tuple(jnp.zeros((), x.dtype) for x in xs)
  return list(jax.lax.reduce(
      tuple(xs), zeros, lambda a, b: tuple(x + y for x, y in zip(a, b)),
      (axis,)))


def _rank1_fwd(q, k, v):
  """Softmax attention of rank-1 heads, heads on the minor axis.

  q, k, v [B, N, H] (one feature per head); logits s[b, t, s, h] =
  q[b, t, h] k[b, s, h] (scale 1 / sqrt(1)). The row max is exact in closed
  form, max_s q_t k_s = max(q_t max_s k_s, q_t min_s k_s), so one pass of
  exp over the [B, N, N, H] logits (fused into the variadic reduce) gives
  the normaliser l and the output o. Returns o [B, N, H] and (m, l).
  """
  kmax = jnp.max(k, axis=1, keepdims=True)
  kmin = jnp.min(k, axis=1, keepdims=True)
  m = jnp.maximum(q * kmax, q * kmin)                         # [B, T, H]
  e = jnp.exp(q[:, :, None] * k[:, None] - m[:, :, None])      # [B, T, S, H]
  l, u = _vsum([e, e * v[:, None]], 2)
  return u / l, m, l


@jax.custom_vjp
def rank1_heads_attention(q, k, v):
  """softmax(q k^T) v per head for heads of rank 1, heads on the last axis.

  q, k, v: [B, N, H] (the one query/key/value feature of each of H heads).
  Returns [B, N, H]. Equal to `jnp.einsum("bnts,bsn->btn",
  softmax(einsum("btn,bsn->bnts", q, k)), v)` (tested to float tolerance,
  values and gradients); computed as broadcast products and variadic
  reductions with the head axis minor, and a hand-written backward pass
  that recomputes the attention weights instead of storing [B, H, N, N]:
    dv_s = sum_t p_ts g_t,
    dq_t = g_t (sum_s p_ts v_s k_s - o_t sum_s p_ts k_s),
    dk_s = sum_t p_ts g_t q_t (v_s - o_t)
  (ds_ts = p_ts g_t (v_s - o_t) for one value feature). Many heads of size
  1 are where the generic [B, N, H, r] einsums spend most of their time in
  transposes and size-1 contractions.
  """
  return _rank1_fwd(q, k, v)[0]


def _rank1_vjp_fwd(q, k, v):
  o, m, l = _rank1_fwd(q, k, v)
  return o, (q, k, v, o, m, l)


def _rank1_vjp_bwd(res, g):
  q, k, v, o, m, l = res
  # p[b, t, s, h] = exp(q_t k_s - m_t - log l_t), recomputed. (Written
  # with log l in the exponent, not as the forward's exp(..) / l, so that
  # XLA does not merge it with the forward's exponentials and keep the
  # [B, N, N, H] array alive between the passes.)
  p = jnp.exp(q[:, :, None] * k[:, None] - (m + jnp.log(l))[:, :, None])
  a, b = _vsum([p * (v * k)[:, None], p * k[:, None]], 2)    # over keys
  dq = g * (a - o * b)
  dv, dk = _vsum([p * g[:, :, None],
                  p * ((g * q)[:, :, None] * (v[:, None] - o[:, :, None]))],
                 1)                                            # over queries
  return dq, dk, dv


rank1_heads_attention.defvjp(_rank1_vjp_fwd, _rank1_vjp_bwd)

# The rank-1 path is used up to this N. Measured (one training step of
# PostNormRankEncoder, d = 16, batch 256, XLA:CPU, interleaved with the
# module path; runs/s14r, 2026-12-02): N = 16 with 64-256 heads 1.7-1.9x
# fewer CPU-s per step, 16 heads 1.1x; N = 64 with 64 heads 0.55x (slower:
# the [B, N, N, H] passes leave the cache), so not used there.
_RANK1_MAX_POINTS = 16


class _PostNormLayer(nnx.Module):
  """h <- N1(h + mean_m Attn_m(h)); h <- N2(h + MLP(h)) (post-norm).

  `fused=True` (default): rank-1 heads (head_dim 1, N <= _RANK1_MAX_POINTS)
  are computed from the `attn` module's parameters by `_fused_attention`
  (one q/k/v matmul, heads on the minor axis, `rank1_heads_attention`);
  every other case, and `fused=False`, calls the module (the formulation
  used before; same parameters, same function up to float rounding; it is
  the reference of the tests and of the timing benchmark). Head-major
  einsums for rank 4 were measured 0.87x (slower), so they are not used.
  """

  def __init__(self, dim: int, rank: int, heads_per_module: int, width: int,
               mlp_dim: int, use_bias: bool, rngs: nnx.Rngs,
               fused: bool = True):
    # `width` torch MultiheadAttention(d, heads_per_module) modules whose
    # outputs are averaged == one layer of width * heads_per_module heads of
    # size `rank` whose output projection is scaled by 1 / width. PyTorch
    # init: in_proj xavier-uniform on the stacked [3d, d] weight, bound
    # sqrt(6 / 4d); out_proj U(+-1/sqrt(d)); all attention biases zero.
    self.width = width
    self.fused = fused
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

  def _fused_attention(self, h):
    """sum over heads of W_O,h softmax(q_h k_h^T) v_h for rank-1 heads.

    The same function as `self.attn(h)` (tested): q, k and v [B, N, H]
    come from one matmul with the three kernels stacked on the head axis,
    the heads stay on the minor axis, `rank1_heads_attention` attends.
    """
    a = self.attn
    w = jnp.concatenate([a.query.kernel[...], a.key.kernel[...],
                         a.value.kernel[...]], axis=1)[..., 0]  # [d, 3H]
    qkv = jnp.einsum("bnd,dh->bnh", h, w)
    if a.query.bias is not None:
      qkv = qkv + jnp.concatenate([a.query.bias[...], a.key.bias[...],
                                   a.value.bias[...]], axis=0)[:, 0]
    q, k, v = jnp.split(qkv, 3, axis=-1)
    o = rank1_heads_attention(q, k, v)                          # [B, N, H]
    return jnp.einsum("bnh,hd->bnd", o, a.out.kernel[...][:, 0])

  def __call__(self, h):
    if (self.fused and h.ndim == 3 and self.attn.head_dim == 1
        and h.shape[-2] <= _RANK1_MAX_POINTS):
      a = self._fused_attention(h) / self.width
    else:
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

  `fused` (default True) only changes how the attention is evaluated
  (`_PostNormLayer._fused_attention`: one q/k/v matmul, head-major einsums,
  `rank1_heads_attention` for rank-1 heads); False evaluates it through
  `MultiHeadAttention.__call__`. Parameters, initialisation and the
  computed function are the same (equal to float rounding, tested).
  """

  def __init__(self, dim: int, rank: int, num_layers: int, *,
               width: int = 1, mlp_dim: int = 2048, use_bias: bool = True,
               fused: bool = True, rngs: nnx.Rngs):
    if dim <= 0 or rank <= 0 or rank > dim or dim % rank:
      raise ValueError(f"`rank` must divide `dim` and lie in [1, dim]; got "
                       f"rank={rank}, dim={dim}.")
    if width < 1 or num_layers < 1:
      raise ValueError(f"`width` and `num_layers` must be >= 1; got "
                       f"width={width}, num_layers={num_layers}.")
    self.dim, self.rank, self.width = dim, rank, width
    self.num_heads = width * (dim // rank)
    self.layers = nnx.List([
        _PostNormLayer(dim, rank, dim // rank, width, mlp_dim, use_bias, rngs,
                       fused=fused)
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
# Head-size transformer and full-rank mixing task (Bhojanapalli et al. 2020).
# ----------------------------------------------------------------------------

def mixing_matrices(key: jax.Array, groups: int, n: int,
                    logit_scale: float = 2.0) -> jax.Array:
  """`groups` fixed random positive row-stochastic n x n matrices P_g.

  Rows are softmax(logit_scale * N(0, 1)): the centred logits log P_g -
  rowmean have rank n - 1 with probability 1, so a head reproduces P_g
  exactly only if its query-key product has rank >= n - 1.
  """
  if groups < 1 or n < 2:
    raise ValueError(f"`groups` must be >= 1 and `n` >= 2; got "
                     f"groups={groups}, n={n}.")
  return jax.nn.softmax(
      logit_scale * jax.random.normal(key, (groups, n, n)), axis=-1)


def mixing_batch(key: jax.Array, p: jax.Array, batch: int):
  """Inputs v [B, n, G] ~ N(0, 1) and targets y[b, i, g] = sum_j P_g[i, j] v[b, j, g].

  Channel g of every token is mixed over positions by its own fixed matrix
  P_g ([G, n, n] from `mixing_matrices`): the optimal attention layer has
  one head per group whose attention matrix is P_g (full rank).
  """
  g, n, _ = p.shape
  v = jax.random.normal(key, (batch, n, g))
  return v, jnp.einsum("gij,bjg->big", p, v)


def centred_logit_rank(logits, rtol: float = 1e-3):
  """Numerical rank of logits with each row's mean removed (softmax
  ignores a per-row constant): number of singular values above
  rtol * the largest, per matrix ([..., n, n] -> [...])."""
  c = logits - jnp.mean(logits, axis=-1, keepdims=True)
  s = jnp.linalg.svd(c.astype(jnp.float32), compute_uv=False)
  return jnp.sum(s > rtol * s[..., :1], axis=-1)


def effective_rank(m):
  """Effective rank exp(H(sigma / sum sigma)) (Roy & Vetterli 2007) of
  each [..., n, n] matrix: 1 for rank one, n for a multiple of the identity."""
  s = jnp.linalg.svd(m.astype(jnp.float32), compute_uv=False)
  q = s / jnp.sum(s, axis=-1, keepdims=True)
  return jnp.exp(-jnp.sum(jnp.where(q > 0, q * jnp.log(
      jnp.where(q > 0, q, 1.0)), 0.0), axis=-1))


class _HeadSizeBlock(nnx.Module):
  """Pre-LayerNorm block: h + Wo attn(LN h); h + MLP(LN h) (GELU).

  Queries, keys and values have `num_heads` heads of `head_dim` features
  each (4 * width * num_heads * head_dim attention weights), whatever the
  width: the standard transformer is head_dim = width / num_heads.
  """

  def __init__(self, width: int, num_heads: int, head_dim: int, mlp_dim: int,
               causal: bool, rngs: nnx.Rngs):
    self.num_heads, self.head_dim, self.causal = num_heads, head_dim, causal
    inner = num_heads * head_dim
    self.ln1 = nnx.LayerNorm(width, rngs=rngs)
    self.wq = nnx.Linear(width, inner, use_bias=False, rngs=rngs)
    self.wk = nnx.Linear(width, inner, use_bias=False, rngs=rngs)
    self.wv = nnx.Linear(width, inner, use_bias=False, rngs=rngs)
    self.wo = nnx.Linear(inner, width, use_bias=False, rngs=rngs)
    self.ln2 = nnx.LayerNorm(width, rngs=rngs)
    self.fc1 = nnx.Linear(width, mlp_dim, rngs=rngs)
    self.fc2 = nnx.Linear(mlp_dim, width, rngs=rngs)

  def _split(self, x):
    return x.reshape(x.shape[:-1] + (self.num_heads, self.head_dim))

  def logits(self, h):
    """Scaled attention logits [B, heads, T, S] (before masking/softmax)."""
    a = self.ln1(h)
    q, k = self._split(self.wq(a)), self._split(self.wk(a))
    return jnp.einsum("btnh,bsnh->bnts", q, k) * self.head_dim ** -0.5

  def __call__(self, h):
    a = self.ln1(h)
    q, k, v = (self._split(w(a)) for w in (self.wq, self.wk, self.wv))
    o = dot_product_attention(q, k, v, is_causal=self.causal)
    h = h + self.wo(o.reshape(o.shape[:-2] + (-1,)))
    return h + self.fc2(jax.nn.gelu(self.fc1(self.ln2(h))))


class HeadSizeTransformer(nnx.Module):
  """Transformer whose head size is set independently of its width.

  Inputs are tokens [B, T] (`vocab_size` given: embedding table) or vectors
  [B, T, in_dim] (linear embedding, no bias); a learned position embedding
  [seq_len, width] is added; `num_layers` `_HeadSizeBlock`s; a final
  LayerNorm and a linear readout to `out_dim` per token. `head_dim=None` is
  the standard transformer (head size width / num_heads); an integer is
  Bhojanapalli et al.'s fixed head size. `causal=True` for language models.
  Attention runs through `attnjax.softmax.dot_product_attention`.
  """

  def __init__(self, *, seq_len: int, width: int, num_heads: int,
               out_dim: int, head_dim: Optional[int] = None,
               vocab_size: Optional[int] = None, in_dim: Optional[int] = None,
               num_layers: int = 1, mlp_ratio: int = 4, causal: bool = False,
               rngs: nnx.Rngs):
    if (vocab_size is None) == (in_dim is None):
      raise ValueError(f"give exactly one of `vocab_size` and `in_dim`; got "
                       f"vocab_size={vocab_size}, in_dim={in_dim}.")
    if head_dim is None and (num_heads < 1 or width % num_heads):
      raise ValueError(f"`width` ({width}) must be divisible by `num_heads` "
                       f"({num_heads}) for the standard head size.")
    if num_heads < 1 or num_layers < 1 or (head_dim is not None
                                            and head_dim < 1):
      raise ValueError(f"`num_heads`, `num_layers`, `head_dim` must be >= 1; "
                       f"got {num_heads}, {num_layers}, {head_dim}.")
    self.seq_len, self.width, self.num_heads = seq_len, width, num_heads
    self.head_dim = width // num_heads if head_dim is None else head_dim
    if vocab_size is not None:
      self.embed = nnx.Embed(vocab_size, width, rngs=rngs)
    else:
      self.embed = nnx.Linear(in_dim, width, use_bias=False, rngs=rngs)
    self.pos = nnx.Param(nnx.initializers.normal(1.0)(rngs.params(),
                                                      (seq_len, width)))
    self.blocks = nnx.List([
        _HeadSizeBlock(width, num_heads, self.head_dim, mlp_ratio * width,
                       causal, rngs) for _ in range(num_layers)])
    self.ln_f = nnx.LayerNorm(width, rngs=rngs)
    self.readout = nnx.Linear(width, out_dim, rngs=rngs)

  def _embed(self, x):
    if x.shape[1] != self.seq_len:
      raise ValueError(f"`x` must have seq_len={self.seq_len} positions, got "
                       f"shape {x.shape}.")
    return self.embed(x) + self.pos[...]

  def __call__(self, x):
    h = self._embed(x)
    for b in self.blocks:
      h = b(h)
    return self.readout(self.ln_f(h))

  def attention_logits(self, x):
    """Per-layer attention logits, [layers, B, heads, T, S] (no mask)."""
    h = self._embed(x)
    out = []
    for b in self.blocks:
      out.append(b.logits(h))
      h = b(h)
    return jnp.stack(out)


def head_size_transformer_params(*, seq_len: int, width: int, num_heads: int,
                                 out_dim: int, head_dim: Optional[int] = None,
                                 vocab_size: Optional[int] = None,
                                 in_dim: Optional[int] = None,
                                 num_layers: int = 1,
                                 mlp_ratio: int = 4) -> int:
  """Closed-form parameter count of `HeadSizeTransformer` (no model built)."""
  p = width // num_heads if head_dim is None else head_dim
  d, m = width, mlp_ratio * width
  embed = (vocab_size if vocab_size is not None else in_dim) * d
  block = 4 * d * num_heads * p + 2 * (2 * d) + d * m + m + m * d + d
  return embed + seq_len * d + num_layers * block + 2 * d + d * out_dim + out_dim


def matched_width(target: int, *, lo: int = 1, hi: int = 4096, **kw) -> int:
  """Width whose `head_size_transformer_params(width=..., **kw)` is closest
  to `target` (parameter matching of the fixed-head-size family)."""
  best = min(range(lo, hi + 1), key=lambda w: (abs(
      head_size_transformer_params(width=w, **kw) - target), w))
  return best
