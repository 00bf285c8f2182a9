"""The geometric view of attention sinks: reference frames (Ruscio, Nanni &
Silvestri 2025, "What are you sinking? A geometric approach on attention
sink", arXiv 2508.02546).

The paper reads sinks as reference points of the representation space and
classifies models' frames as centralized (one dominant reference token, a
star-shaped attention graph), distributed (several weaker reference points)
or bidirectional (two anchors, e.g. the first and last special tokens of
an encoder). The measurements below follow the definitions of the authors'
released analysis code (ValeRuscio/What-are-you-sinking-, notebooks
reference_point, laplacian/fiedler and KL); all take recorded attention
probabilities [B, N, T, S] of one layer (self-attention, T = S) and are
computed per example in float64 NumPy.

* `reference_tokens(maps, threshold=0.1)`: [B, S] bool. A key is a
  reference token when the mean attention it receives (heads averaged,
  then queries averaged) exceeds `threshold`; if none does, the top 10% of
  keys (at least one); at most 30% of the keys (the most attended).
* `reference_decomposition(maps, values, ref)`: the head-averaged output
  o_i = sum_j A_ij v_j of query i split into the reference part
  r_i = sum_{j in ref} A_ij v_j and the rest. Per query: relative magnitude
  |r_i| / |o_i| (clipped to [0, 1]), directional influence
  (cos(r_i, o_i) + 1) / 2, and information change |o_i - (o_i - r_i)|.
  Reference queries themselves are excluded (mask `valid`). The authors
  pass the layer's input hidden states as `values`.
* `attention_graph_stats(maps, threshold=0.01)`: the attention graph with
  an edge i -> j where the head-averaged weight A_ij > threshold. In-degree
  statistics (star-likeness max_in / (n - 1), Gini coefficient of the
  in-degrees, degree centralization sum(max_in - d_j) / (n - 1)^2, the
  combined star-likeness 0.3 * basic + 0.7 * Gini) and the spectrum of the
  Laplacian of the symmetrized graph (A + A^T) / 2: Fiedler value
  (algebraic connectivity, lambda_2) and spectral gap lambda_3 - lambda_2.
  Self-attention edges (the diagonal) count as in the authors' code.
* `sink_kl(maps, percentile=0.9)`: sinks = keys whose total received
  attention (summed over heads and queries) is at least that percentile;
  per head, the mean over queries of KL(head row || head-average row), with
  and without the sinks (sink columns zeroed, rows renormalized, all-sink
  rows uniform over the other keys); `reduction` = with - without.
"""

from __future__ import annotations

import numpy as np

from attnjax.analysis.head_stats import check_maps

__all__ = ["reference_tokens", "reference_decomposition",
           "attention_graph_stats", "sink_kl"]


def _maps64(maps):
  m = np.asarray(check_maps(maps), np.float64)
  if m.shape[-1] != m.shape[-2]:
    raise ValueError(f"`maps` must be self-attention [B, N, T, T], got "
                     f"{m.shape}.")
  return m


def _mean_map(maps):
  """Head-averaged [B, T, T], rows renormalized (zero rows stay zero)."""
  a = _maps64(maps).mean(1)
  s = a.sum(-1, keepdims=True)
  return np.where(s > 1e-10, a / np.maximum(s, 1e-10), 0.0)


def reference_tokens(maps, threshold: float = 0.1,
                     fallback_fraction: float = 0.1,
                     max_fraction: float = 0.3):
  """[B, S] bool: the reference (sink) tokens of each example."""
  a = _maps64(maps).mean(1)                      # heads averaged, not renormalized
  received = a.mean(1)                           # [B, S] mean over queries
  b, s = received.shape
  out = np.zeros((b, s), bool)
  top_n = max(1, int(fallback_fraction * s))
  cap = max(1, int(max_fraction * s))
  for i in range(b):
    idx = np.nonzero(received[i] > threshold)[0]
    if idx.size == 0:
      idx = np.argsort(received[i], kind="stable")[-top_n:]
    if idx.size > cap:
      idx = idx[np.argsort(received[i, idx], kind="stable")[-cap:]]
    out[i, idx] = True
  return out


def reference_decomposition(maps, values, ref):
  """Per-query reference-point influence: dict of [B, T] arrays
  `relative_magnitude`, `directional_influence`, `information_change`, the
  [B, T] bool `valid` (non-reference queries), and their means over valid
  queries [B] (`*_mean`)."""
  a = _mean_map(maps)                            # [B, T, T]
  v = np.asarray(values, np.float64)
  ref = np.asarray(ref, bool)
  b, t, _ = a.shape
  if v.ndim != 3 or v.shape[:2] != (b, t):
    raise ValueError(f"`values` must be [batch, tokens, dim]=({b}, {t}, D), "
                     f"got {v.shape}.")
  if ref.shape != (b, t):
    raise ValueError(f"`ref` must be [batch, tokens]=({b}, {t}), got "
                     f"{ref.shape}.")
  post = np.einsum("bij,bjd->bid", a, v)
  r = np.einsum("bij,bjd->bid", a * ref[:, None, :], v)
  non = post - r
  r_norm = np.linalg.norm(r, axis=-1)
  o_norm = np.linalg.norm(post, axis=-1)
  small_o = o_norm < 1e-10
  rel = np.where(small_o, np.where(r_norm < 1e-10, 0.0, 1.0),
                 np.clip(r_norm / np.maximum(o_norm, 1e-10), 0.0, 1.0))
  cos = np.einsum("bid,bid->bi", r, post) / np.maximum(r_norm * o_norm, 1e-300)
  direc = np.where((r_norm < 1e-10) | small_o, 0.5,
                   (np.clip(cos, -1.0, 1.0) + 1.0) / 2.0)
  info = np.linalg.norm(post - non, axis=-1)
  valid = ~ref
  out = {"relative_magnitude": rel, "directional_influence": direc,
         "information_change": info, "valid": valid}
  cnt = np.maximum(valid.sum(-1), 1)
  for k in ("relative_magnitude", "directional_influence",
            "information_change"):
    out[k + "_mean"] = np.where(valid, out[k], 0.0).sum(-1) / cnt
  return out


def _gini(x):
  x = np.sort(np.asarray(x, np.float64))
  n = x.size
  if n == 0 or x.sum() <= 0:
    return 0.0
  i = np.arange(1, n + 1)
  return float(2 * np.sum(i * x) / (n * x.sum()) - (n + 1) / n)


def attention_graph_stats(maps, threshold: float = 0.01):
  """Star/centralization and Laplacian statistics of each example's
  thresholded head-averaged attention graph: dict of [B] arrays."""
  a = _maps64(maps).mean(1)
  b, n, _ = a.shape
  keys = ("basic_star_likeness", "gini", "degree_centralization",
          "star_likeness", "fiedler_value", "spectral_gap", "max_in_degree")
  out = {k: np.zeros(b) for k in keys}
  for i in range(b):
    adj = (a[i] > threshold).astype(np.float64)   # edge query -> key
    indeg = adj.sum(0)
    mx = indeg.max()
    basic = mx / max(1, n - 1)
    gini = _gini(indeg)
    denom = (n - 1) ** 2
    cent = float(np.sum(mx - indeg) / denom) if denom > 0 and mx > 0 else 0.0
    sym = (adj + adj.T) / 2.0
    lap = np.diag(sym.sum(1)) - sym
    ev = np.sort(np.linalg.eigvalsh(lap))
    out["basic_star_likeness"][i] = basic
    out["gini"][i] = gini
    out["degree_centralization"][i] = cent
    out["star_likeness"][i] = 0.3 * basic + 0.7 * gini
    out["fiedler_value"][i] = ev[1] if n > 1 else 0.0
    out["spectral_gap"][i] = ev[2] - ev[1] if n > 2 else 0.0
    out["max_in_degree"][i] = mx
  return out


def _kl_rows(p, q):
  """Mean over rows of KL(p_row || q_row) (nats); p, q [T, S]."""
  safe_q = np.maximum(q, 1e-300)
  terms = np.where(p > 0, p * (np.log(np.where(p > 0, p, 1.0)) - np.log(safe_q)),
                   0.0)
  return terms.sum(-1).mean(-1)


def sink_kl(maps, percentile: float = 0.9):
  """Head-vs-average KL with and without the sinks: dict with `sinks`
  [B, S] bool and `with_sinks`, `without_sinks`, `reduction` [B, N]."""
  m = _maps64(maps)
  b, nh, t, s = m.shape
  if not 0.0 <= percentile <= 1.0:
    raise ValueError(f"`percentile` must be in [0, 1], got {percentile}.")
  rows = m.sum(-1, keepdims=True)
  p = np.where(rows > 0, m / np.maximum(rows, 1e-300), 1.0 / s)
  sinks = np.zeros((b, s), bool)
  with_s = np.zeros((b, nh))
  without = np.zeros((b, nh))
  for i in range(b):
    incoming = m[i].sum((0, 1))
    sinks[i] = incoming >= np.percentile(incoming, percentile * 100)
    avg = p[i].mean(0)
    with_s[i] = [_kl_rows(p[i, h], avg) for h in range(nh)]
    q = np.where(sinks[i][None, None, :], 0.0, p[i])
    qs = q.sum(-1, keepdims=True)
    n_other = max(int((~sinks[i]).sum()), 1)
    uniform = np.where(sinks[i], 0.0, 1.0 / n_other)
    q = np.where(qs > 0, q / np.maximum(qs, 1e-300), uniform)
    avg_q = q.mean(0)
    without[i] = [_kl_rows(q[h], avg_q) for h in range(nh)]
  return {"sinks": sinks, "with_sinks": with_s, "without_sinks": without,
          "reduction": with_s - without}
