"""Agent attention as in the official Agent-DeiT (Han et al., ECCV 2024).

`AgentDeiTAttention` has the parameters of the official `AgentAttention`
(LeapLabTHU/Agent-Attention, agent_transformer/models/agent_deit.py) so an
official state dict loads one to one: `qkv` Linear(dim, 3 dim), `proj`,
a 3x3 depth-wise `dwc` conv on the values, and the agent biases `an_bias`,
`na_bias` [heads, agents, 7, 7] (bilinearly resized to the token grid),
`ah_bias`/`aw_bias`/`ha_bias`/`wa_bias` (per row / column of the grid) and
`ac_bias`/`ca_bias` (the cls token).

`window` is the training grid (224 / 16 = 14); on another token grid
(gh, gw) (other resolutions, padded inputs) the biases are resized to it
(bilinear, as the official code already does for an/na_bias; identity on
the training grid), which the official code, fixed to one grid, cannot do.

The computation composes `attnjax.dot_product_attention` twice, as the
paper's agent attention (agents = the adaptive-average-pooled queries of the
patch tokens):

  agent_v = softmax(A K^T / sqrt(d) + agent<-token bias) V
  out     = softmax(Q A^T / sqrt(d) + token<-agent bias) agent_v
            + dwc(V) on the patch tokens

(the library primitive `attnjax.sequence.agent_attention` is the same
two-softmax computation without the biases and the dwc term; the `agent_vit`
model uses it).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnjax.softmax import dot_product_attention
from attnjax.models.vision._layers import conv


def _torch_linear_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] weights of torch bilinear interpolation along one axis
  (align_corners=False, no antialiasing)."""
  f = np.float32
  scale = f(n_in) / f(n_out)
  src = np.maximum((np.arange(n_out, dtype=f) + f(0.5)) * scale - f(0.5), 0)
  i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  i1 = np.minimum(i0 + 1, n_in - 1)
  lam = (src - i0).astype(f)
  m = np.zeros((n_out, n_in), np.float64)
  np.add.at(m, (np.arange(n_out), i0), 1 - lam)
  np.add.at(m, (np.arange(n_out), i1), lam)
  return m


def _adaptive_pool_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] of torch AdaptiveAvgPool along one axis."""
  m = np.zeros((n_out, n_in), np.float64)
  for i in range(n_out):
    s = (i * n_in) // n_out
    e = -((-(i + 1) * n_in) // n_out)
    m[i, s:e] = 1.0 / (e - s)
  return m


class AgentDeiTAttention(nnx.Module):
  """Official-layout agent attention on tokens [B, 1 + window^2, dim]."""

  def __init__(self, dim: int, num_heads: int, *, agent_num: int = 49,
               window: int = 14, qkv_bias: bool = True, rngs: nnx.Rngs):
    if dim % num_heads:
      raise ValueError(
          f"`dim` ({dim}) must be divisible by `num_heads` ({num_heads}).")
    pool = int(round(math.sqrt(agent_num)))
    if pool * pool != agent_num:
      raise ValueError(f"`agent_num` must be a square, got {agent_num}.")
    self.num_heads = num_heads
    self.head_dim = dim // num_heads
    self.agent_num = agent_num
    self.pool_size = pool
    self.window = window
    self.qkv = nnx.Linear(dim, 3 * dim, use_bias=qkv_bias, rngs=rngs)
    self.proj = nnx.Linear(dim, dim, rngs=rngs)
    self.dwc = conv(dim, dim, 3, groups=dim, rngs=rngs)
    init = nnx.initializers.truncated_normal(0.02)
    n, a, w = num_heads, agent_num, window
    p = lambda *s: nnx.Param(init(rngs.params(), s))
    self.an_bias = p(n, a, 7, 7)
    self.na_bias = p(n, a, 7, 7)
    self.ah_bias = p(1, n, a, w, 1)
    self.aw_bias = p(1, n, a, 1, w)
    self.ha_bias = p(1, n, w, 1, a)
    self.wa_bias = p(1, n, 1, w, a)
    self.ac_bias = p(1, n, a, 1)
    self.ca_bias = p(1, n, 1, a)

  def biases(self, grid):
    """(agent<-token bias [N, A, 1 + gh gw], token<-agent bias
    [N, 1 + gh gw, A]) for a gh x gw token grid."""
    n, a = self.num_heads, self.agent_num
    gh, gw = grid
    lin = lambda i, o: jnp.asarray(_torch_linear_matrix(i, o), jnp.float32)
    mh, mw = lin(7, gh), lin(7, gw)
    rh, rw = lin(self.window, gh), lin(self.window, gw)
    an = jnp.einsum("ih,jw,nahw->naij", mh, mw, self.an_bias[...])
    na = jnp.einsum("ih,jw,nahw->nija", mh, mw, self.na_bias[...])
    ah = jnp.einsum("ih,naho->naio", rh, self.ah_bias[...][0])   # [N,A,gh,1]
    aw = jnp.einsum("jw,naow->naoj", rw, self.aw_bias[...][0])   # [N,A,1,gw]
    ha = jnp.einsum("ih,nhoa->nioa", rh, self.ha_bias[...][0])   # [N,gh,1,A]
    wa = jnp.einsum("jw,nowa->noja", rw, self.wa_bias[...][0])   # [N,1,gw,A]
    pb = (an + ah + aw).reshape(n, a, gh * gw)
    pb = jnp.concatenate([self.ac_bias[...][0], pb], axis=-1)
    ab = (na + ha + wa).reshape(n, gh * gw, a)
    ab = jnp.concatenate([self.ca_bias[...][0], ab], axis=1)
    return pb, ab

  def _grid(self, t, grid):
    if grid is None:
      grid = (self.window, self.window)
    if t != 1 + grid[0] * grid[1]:
      raise ValueError(
          f"`x` must have 1 + gh * gw tokens for grid={tuple(grid)} (the "
          f"cls token first), got {t} tokens.")
    return tuple(grid)

  def _qkv_agents(self, x, grid):
    b, t, c = x.shape
    gh, gw = grid
    qkv = self.qkv(x).reshape(b, t, 3, c)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    ph = jnp.asarray(_adaptive_pool_matrix(gh, self.pool_size), jnp.float32)
    pw = jnp.asarray(_adaptive_pool_matrix(gw, self.pool_size), jnp.float32)
    agents = jnp.einsum("ih,jw,bhwc->bijc", ph, pw,
                        q[:, 1:].reshape(b, gh, gw, c)).reshape(b, -1, c)
    heads = lambda z: z.reshape(*z.shape[:2], self.num_heads, self.head_dim)
    return heads(q), heads(k), heads(v), heads(agents), v

  def attention_map(self, x, grid=None):
    """[B, N, T, T]: the token-to-token weights of the two softmaxes
    (rows sum to 1; the dwc term is not attention and not included)."""
    from attnjax.softmax import attention_weights
    grid = self._grid(x.shape[1], grid)
    q, k, _, a, _ = self._qkv_agents(x, grid)
    pb, ab = self.biases(grid)
    p_at = attention_weights(a, k, bias=pb[None])      # [B, N, A, T]
    p_ta = attention_weights(q, a, bias=ab[None])      # [B, N, T, A]
    return jnp.einsum("bnta,bnas->bnts", p_ta, p_at)

  def __call__(self, x, grid=None):
    """x [B, 1 + gh*gw, dim] (cls first); grid (gh, gw), default window^2."""
    b, t, c = x.shape
    grid = self._grid(t, grid)
    q, k, v, a, v_flat = self._qkv_agents(x, grid)
    pb, ab = self.biases(grid)
    agent_v = dot_product_attention(a, k, v, bias=pb[None])
    out = dot_product_attention(q, a, agent_v, bias=ab[None]).reshape(b, t, c)
    gh, gw = grid
    local = self.dwc(v_flat[:, 1:].reshape(b, gh, gw, c)).reshape(
        b, gh * gw, c)
    out = jnp.concatenate([out[:, :1], out[:, 1:] + local], axis=1)
    return self.proj(out)
