"""Graph attention over edge lists: GAT (Velickovic et al. 2018) and GATv2
(Brody et al. 2022, "How Attentive are Graph Attention Networks?").

For an edge j -> i (`edges[e] = (j, i)`: source j, target i) and per-head
projected node features (the layer's W h, `[num_nodes, heads, F]`):

  GAT:   e_ij = LeakyReLU(a_dst . x_i + a_src . x_j)          (static)
  GATv2: e_ij = a . LeakyReLU(x_dst_i + x_src_j)              (dynamic)
  alpha_ij = softmax over the incoming edges of i of e_ij
  out_i    = sum_j alpha_ij x_src_j

The softmax is a segment softmax over edges grouped by target
(`jax.ops.segment_max` / `segment_sum`), so time and memory are linear in
the number of edges (GAT gathers per-node scalars, GATv2 per-edge [heads, F]
vectors); no [num_nodes, num_nodes] array is formed. A node without incoming
edges gets zeros. Duplicate edges count as separate edges (a multigraph);
self-loops are not added implicitly (`add_self_loops`).

`edge_mask` [E] (True = edge present) pads edge lists to a fixed length
under jit: a masked edge's indices may hold anything (even out of range) and
change nothing, and its gradient contributions are zero.

The `*_reference` functions build the dense [N, N] edge-count matrix and run
a masked dense softmax weighted by the counts (the multigraph softmax), a
quadratic-memory formulation used only to check the primitive.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax._dispatch import Op
from attnjax._numerics import NEG, masked_softmax
from attnjax.sequence import _common

__all__ = ["GraphAttention", "add_self_loops", "gat_attention",
           "gat_attention_reference", "gatv2_attention",
           "gatv2_attention_reference"]

_OP = Op("graph_attention")


def add_self_loops(edges, num_nodes: int):
  """edges [E, 2] with the N self-loops (i, i) appended: [E + N, 2]."""
  num_nodes = _common.check_positive_int("num_nodes", num_nodes)
  edges = jnp.asarray(edges)
  loops = jnp.arange(num_nodes, dtype=edges.dtype)
  return jnp.concatenate([edges, jnp.stack([loops, loops], axis=1)], axis=0)


def _check(x_src, x_dst, attn, edges, edge_mask):
  for name, x in (("x_src", x_src), ("x_dst", x_dst)):
    if x.ndim != 3:
      raise ValueError(f"`{name}` must be [num_nodes, heads, features], got "
                       f"shape {tuple(x.shape)}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"`{name}` must be floating point, got {x.dtype}.")
  if x_src.shape[1:] != x_dst.shape[1:]:
    raise ValueError(f"`x_src` and `x_dst` must agree in [heads, features]: "
                     f"shapes {tuple(x_src.shape)}, {tuple(x_dst.shape)}.")
  for name, a in attn.items():
    if tuple(a.shape) != tuple(x_src.shape[1:]):
      raise ValueError(f"`{name}` must be [heads, features] = "
                       f"{list(x_src.shape[1:])}, got {tuple(a.shape)}.")
  edges = jnp.asarray(edges)
  if edges.ndim != 2 or edges.shape[1] != 2:
    raise ValueError(f"`edges` must be [num_edges, 2] (source, target), got "
                     f"shape {tuple(edges.shape)}.")
  if not jnp.issubdtype(edges.dtype, jnp.integer):
    raise ValueError(f"`edges` must be integer, got dtype {edges.dtype}.")
  e = edges.shape[0]
  if edge_mask is not None:
    edge_mask = jnp.asarray(edge_mask)
    if edge_mask.dtype != jnp.bool_ or tuple(edge_mask.shape) != (e,):
      raise ValueError(f"`edge_mask` must be boolean [{e}] (one per edge), got "
                       f"{edge_mask.dtype} {tuple(edge_mask.shape)}.")
  if (e and not isinstance(edges, jax.core.Tracer) and
      not isinstance(edge_mask, jax.core.Tracer)):
    import numpy as np  # pylint: disable=import-outside-toplevel
    ed = np.asarray(edges)
    ok = (np.ones(e, bool) if edge_mask is None else np.asarray(edge_mask))
    bad_src = ed[ok, 0][(ed[ok, 0] < 0) | (ed[ok, 0] >= x_src.shape[0])]
    bad_dst = ed[ok, 1][(ed[ok, 1] < 0) | (ed[ok, 1] >= x_dst.shape[0])]
    if bad_src.size or bad_dst.size:
      raise ValueError(
          f"`edges` index out of range: sources must be in [0, "
          f"{x_src.shape[0]}) (x_src shape {tuple(x_src.shape)}) and targets "
          f"in [0, {x_dst.shape[0]}) (x_dst shape {tuple(x_dst.shape)}); got "
          f"sources {bad_src[:5].tolist()} targets {bad_dst[:5].tolist()}.")
  return edges, edge_mask


def _edge_scores(version, xs, xd, attn, src, dst, slope):
  """Per-edge logits [E, heads] in float32."""
  if version == "gat":
    s_src = jnp.einsum("nhf,hf->nh", xs, attn["a_src"].astype(jnp.float32))
    s_dst = jnp.einsum("nhf,hf->nh", xd, attn["a_dst"].astype(jnp.float32))
    return jax.nn.leaky_relu(s_src[src] + s_dst[dst], slope)
  z = jax.nn.leaky_relu(xs[src] + xd[dst], slope)           # [E, H, F]
  return jnp.einsum("ehf,hf->eh", z, attn["a"].astype(jnp.float32))


def _xla_backend(config, version, x_src, x_dst, attn, edges, edge_mask,
                 slope):
  del config
  n_dst = x_dst.shape[0]
  xs = x_src.astype(jnp.float32)
  xd = x_dst.astype(jnp.float32)
  src, dst = edges[:, 0], edges[:, 1]
  if edge_mask is not None:
    # Masked edges read node 0 and write to segment n_dst (dropped).
    src = jnp.where(edge_mask, src, 0)
    dst_read = jnp.where(edge_mask, dst, 0)
    dst_write = jnp.where(edge_mask, dst, n_dst)
  else:
    dst_read = dst_write = dst
  logits = _edge_scores(version, xs, xd, attn, src, dst_read, slope)
  if edge_mask is not None:
    logits = jnp.where(edge_mask[:, None], logits, NEG)
  m = jax.ops.segment_max(logits, dst_write, num_segments=n_dst)
  m = jax.lax.stop_gradient(jnp.where(m > 0.5 * NEG, m, 0.0))
  p = jnp.exp(logits - m[dst_read])
  if edge_mask is not None:
    p = jnp.where(edge_mask[:, None], p, 0.0)
  den = jax.ops.segment_sum(p, dst_write, num_segments=n_dst)
  alpha = p / jnp.where(den > 0, den, 1.0)[dst_read]
  msg = alpha[..., None] * xs[src]
  out = jax.ops.segment_sum(msg, dst_write, num_segments=n_dst)
  return out


_OP.register("xla", _xla_backend)


def _run(version, x_src, x_dst, attn, edges, edge_mask, negative_slope,
         implementation):
  x_src, x_dst = jnp.asarray(x_src), jnp.asarray(x_dst)
  edges, edge_mask = _check(x_src, x_dst, attn, edges, edge_mask)
  out = _OP(implementation, version, x_src, x_dst, attn, edges, edge_mask,
            float(negative_slope))
  return out.astype(x_src.dtype)


def gat_attention(x, a_src, a_dst, edges, *, edge_mask=None,
                  negative_slope: float = 0.2, x_dst=None,
                  implementation=None):
  """GAT aggregation (static attention).

  Args:
    x: projected source features W h [num_nodes, heads, F].
    a_src, a_dst: attention vectors [heads, F] (the two halves of the
      paper's a).
    edges: int [E, 2] rows (source j, target i).
    edge_mask: optional bool [E], True = edge present.
    negative_slope: LeakyReLU slope (0.2 in the paper).
    x_dst: target features for bipartite graphs (default x).
    implementation: dispatch of op "graph_attention" (only "xla").

  Returns:
    [num_target_nodes, heads, F] in x.dtype (no nonlinearity, no head
    concat/mean: the layer applies those); zeros for nodes without incoming
    edges.
  """
  x = jnp.asarray(x)
  x_dst = x if x_dst is None else x_dst
  return _run("gat", x, x_dst, {"a_src": jnp.asarray(a_src),
                                "a_dst": jnp.asarray(a_dst)},
              edges, edge_mask, negative_slope, implementation)


def gatv2_attention(x_src, x_dst, a, edges, *, edge_mask=None,
                    negative_slope: float = 0.2, implementation=None):
  """GATv2 aggregation (dynamic attention): e_ij = a . LeakyReLU(x_dst_i +
  x_src_j) with x_src = W_s h, x_dst = W_t h [num_nodes, heads, F]; a
  [heads, F]; messages are x_src_j. Other arguments as `gat_attention`."""
  return _run("gatv2", x_src, x_dst, {"a": jnp.asarray(a)}, edges, edge_mask,
              negative_slope, implementation)


def _dense_reference(version, x_src, x_dst, attn, edges, edge_mask, slope):
  x_src, x_dst = jnp.asarray(x_src), jnp.asarray(x_dst)
  edges, edge_mask = _check(x_src, x_dst, attn, edges, edge_mask)
  n_src, n_dst = x_src.shape[0], x_dst.shape[0]
  w = jnp.ones(edges.shape[0]) if edge_mask is None else edge_mask.astype(
      jnp.float32)
  src = jnp.clip(edges[:, 0], 0, n_src - 1)
  dst = jnp.clip(edges[:, 1], 0, n_dst - 1)
  counts = jnp.zeros((n_dst, n_src)).at[dst, src].add(w)      # [i, j]
  xs, xd = x_src.astype(jnp.float32), x_dst.astype(jnp.float32)
  if version == "gat":
    s = (jnp.einsum("jhf,hf->hj", xs, attn["a_src"])[:, None, :] +
         jnp.einsum("ihf,hf->hi", xd, attn["a_dst"])[:, :, None])
    logits = jax.nn.leaky_relu(s, slope)                       # [h, i, j]
  else:
    z = jax.nn.leaky_relu(xd[:, None] + xs[None, :], slope)   # [i, j, h, f]
    logits = jnp.einsum("ijhf,hf->hij", z, attn["a"])
  ok = counts[None] > 0
  # count-weighted softmax: log(count) added to the logits of present pairs
  logits = logits + jnp.log(jnp.where(ok, counts[None], 1.0))
  p = masked_softmax(logits, ok, axis=-1)
  return jnp.einsum("hij,jhf->ihf", p, xs).astype(x_src.dtype)


def gat_attention_reference(x, a_src, a_dst, edges, *, edge_mask=None,
                            negative_slope: float = 0.2, x_dst=None):
  """Dense [N, N] edge-count formulation of `gat_attention`."""
  x = jnp.asarray(x)
  return _dense_reference("gat", x, x if x_dst is None else x_dst,
                          {"a_src": jnp.asarray(a_src),
                           "a_dst": jnp.asarray(a_dst)},
                          edges, edge_mask, negative_slope)


def gatv2_attention_reference(x_src, x_dst, a, edges, *, edge_mask=None,
                              negative_slope: float = 0.2):
  """Dense [N, N] edge-count formulation of `gatv2_attention`."""
  return _dense_reference("gatv2", x_src, x_dst, {"a": jnp.asarray(a)}, edges,
                          edge_mask, negative_slope)


class GraphAttention(nnx.Module):
  """A GAT / GATv2 layer: `layer(h, edges, edge_mask=None)` -> [N, out].

  version "gat": x = h W, logits from a_src / a_dst; "gatv2": x_src = h W_s,
  x_dst = h W_t, logits a . LeakyReLU(x_dst_i + x_src_j). Heads are
  concatenated (`concat=True`, output heads * out_features) or averaged;
  a bias is added. The nonlinearity is left to the caller (the paper's
  sigma / ELU). `self_loops=True` appends the self-loops before attending.
  """

  def __init__(self, in_features: int, out_features: int, num_heads: int = 1,
               *, version: str = "gat", concat: bool = True,
               negative_slope: float = 0.2, self_loops: bool = False,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    if version not in ("gat", "gatv2"):
      raise ValueError(f"`version` must be 'gat' or 'gatv2', got {version!r}.")
    in_features = _common.check_positive_int("in_features", in_features)
    out_features = _common.check_positive_int("out_features", out_features)
    num_heads = _common.check_positive_int("num_heads", num_heads)
    self.version, self.concat = version, concat
    self.num_heads, self.out_features = num_heads, out_features
    self.negative_slope, self.self_loops = negative_slope, self_loops
    init = nnx.initializers.glorot_uniform()
    shape = (in_features, num_heads * out_features)
    self.w_src = nnx.Param(init(rngs.params(), shape, param_dtype))
    self.w_dst = (nnx.Param(init(rngs.params(), shape, param_dtype))
                  if version == "gatv2" else None)
    ashape = (num_heads, out_features)
    a_init = nnx.initializers.normal(1.0 / math.sqrt(out_features))
    if version == "gat":
      self.a_src = nnx.Param(a_init(rngs.params(), ashape, param_dtype))
      self.a_dst = nnx.Param(a_init(rngs.params(), ashape, param_dtype))
    else:
      self.a = nnx.Param(a_init(rngs.params(), ashape, param_dtype))
    width = num_heads * out_features if concat else out_features
    self.bias = nnx.Param(jnp.zeros((width,), param_dtype))

  def __call__(self, h, edges, *, edge_mask=None):
    h = jnp.asarray(h)
    if h.ndim != 2:
      raise ValueError(f"`h` must be [num_nodes, in_features], got shape "
                       f"{tuple(h.shape)}.")
    n = h.shape[0]
    if self.self_loops:
      edges = add_self_loops(edges, n)
      if edge_mask is not None:
        edge_mask = jnp.concatenate([edge_mask, jnp.ones((n,), bool)])
    shape = (n, self.num_heads, self.out_features)
    xs = (h @ self.w_src.value.astype(h.dtype)).reshape(shape)
    if self.version == "gat":
      out = gat_attention(xs, self.a_src.value, self.a_dst.value, edges,
                          edge_mask=edge_mask,
                          negative_slope=self.negative_slope)
    else:
      xd = (h @ self.w_dst.value.astype(h.dtype)).reshape(shape)
      out = gatv2_attention(xs, xd, self.a.value, edges, edge_mask=edge_mask,
                            negative_slope=self.negative_slope)
    out = (out.reshape(n, -1) if self.concat else jnp.mean(out, axis=1))
    return out + self.bias.value.astype(out.dtype)
