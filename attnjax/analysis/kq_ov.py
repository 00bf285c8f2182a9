"""Structure metrics for per-head merged KQ / OV matrices.

For an attention layer with per-head query/key/value/output maps, the merged
matrices KQ_h (the bilinear form of the attention score, [N, D_kv, D_q]) and
OV_h (what an attended token writes, [N, D_kv, D_out]) summarize what each head
does. `attnjax.MultiHeadAttention.merged_matrices()` returns them; these
functions measure the patterns studied by He et al. (ICML 2025) for
in-context regression and are written for any head count and size:

* `diagonal_ratio`: ||diag(M)||_2 / ||M||_F (1 = purely diagonal).
* `normalized_diagonal_variance`: Var(diag M) / mean(diag(M)^2) (0 = all
  diagonal entries equal, i.e. M ~ c I on the diagonal; 1 = zero-mean
  diagonal).
* `last_entry_ratio`: |v[-1]| / ||v||_2 of a vector (e.g. the OV column:
  1 = the head only copies the last coordinate, the response y).
* `active_heads`: heads whose output norm is a non-negligible fraction of
  the largest head's.
* `zero_sum_ratio`: |sum_h a_h| / sum_h |a_h| over selected heads (0 = the
  values cancel exactly, 1 = all of one sign).
* `matrix_cosine`: <A, B>_F / (||A|| ||B||), to compare a learned matrix
  with a reference form (identity, a preconditioner, ...).
* `head_selectivity`: how a head's output mass splits over groups of
  coordinates (multi-task readout).

All accept NumPy or JAX arrays with any leading batch dims (heads, time) and
return NumPy arrays (float64).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

_EPS = 1e-30


def _np(x) -> np.ndarray:
  return np.asarray(x, dtype=np.float64)


def _square(m, name="m"):
  m = _np(m)
  if m.ndim < 2 or m.shape[-1] != m.shape[-2]:
    raise ValueError(f"`{name}` must be [..., n, n], got shape {m.shape}.")
  return m


def block(m, rows: Optional[slice] = None, cols: Optional[slice] = None):
  """m[..., rows, cols] (default: everything)."""
  m = _np(m)
  return m[..., rows if rows is not None else slice(None),
           cols if cols is not None else slice(None)]


def diagonal(m) -> np.ndarray:
  m = _square(m)
  return np.diagonal(m, axis1=-2, axis2=-1)


def diagonal_ratio(m) -> np.ndarray:
  """||diag(M)||_2 / ||M||_F over the last two (square) axes; in [0, 1]."""
  m = _square(m)
  dg = np.linalg.norm(diagonal(m), axis=-1)
  fro = np.sqrt(np.sum(m * m, axis=(-2, -1)))
  return dg / np.maximum(fro, _EPS)


def diagonal_mean(m) -> np.ndarray:
  """Mean of the diagonal (the 'omega' of a near-scaled-identity M)."""
  return np.mean(diagonal(m), axis=-1)


def normalized_diagonal_variance(m) -> np.ndarray:
  """Var(diag M) / mean(diag(M)^2), in [0, 1]; 0 = homogeneous diagonal."""
  dg = diagonal(m)
  return np.var(dg, axis=-1) / np.maximum(np.mean(dg * dg, axis=-1), _EPS)


def last_entry_ratio(v, axis: int = -1) -> np.ndarray:
  """|v[-1]| / ||v||_2 along `axis`; matrices [.., n, 1] may pass axis=-2."""
  v = _np(v)
  last = np.take(v, -1, axis=axis)
  return np.abs(last) / np.maximum(np.linalg.norm(v, axis=axis), _EPS)


def head_norms(x) -> np.ndarray:
  """Frobenius norm of each head's matrix: x [N, ...] -> [N]."""
  x = _np(x)
  return np.sqrt(np.sum(x.reshape(x.shape[0], -1) ** 2, axis=-1))


def active_heads(ov, rel_threshold: float = 0.1) -> np.ndarray:
  """Bool [N]: heads with ||OV_h|| >= rel_threshold * max_h ||OV_h||.

  A head whose OV map is negligible cannot change the output, whatever its
  attention pattern.
  """
  n = head_norms(ov)
  if n.size == 0:
    raise ValueError("`ov` must have at least one head.")
  return n >= rel_threshold * max(float(n.max()), _EPS)


def zero_sum_ratio(values, select=None) -> float:
  """|sum a_h| / sum |a_h| over the selected heads (nan if none selected)."""
  a = _np(values).reshape(-1)
  if select is not None:
    a = a[np.asarray(select, bool).reshape(-1)]
  if a.size == 0:
    return float("nan")
  return float(abs(a.sum()) / max(np.abs(a).sum(), _EPS))


def matrix_cosine(a, b) -> np.ndarray:
  """<A, B>_F / (||A||_F ||B||_F) over the last two axes (broadcasting)."""
  a, b = _np(a), _np(b)
  num = np.sum(a * b, axis=(-2, -1))
  den = (np.sqrt(np.sum(a * a, axis=(-2, -1))) *
         np.sqrt(np.sum(b * b, axis=(-2, -1))))
  return num / np.maximum(den, _EPS)


def head_selectivity(weights, groups: Sequence[Sequence[int]]) -> np.ndarray:
  """Fraction of each head's squared mass in each coordinate group.

  weights [N, n] (e.g. the absolute readout of each task by each head);
  groups: index lists. Returns [N, len(groups)], rows summing to 1 over the
  groups (for groups that partition the coordinates).
  """
  w = _np(weights) ** 2
  mass = np.stack([w[:, list(g)].sum(axis=-1) for g in groups], axis=-1)
  return mass / np.maximum(mass.sum(axis=-1, keepdims=True), _EPS)


def summarize_heads(kq, ov, *, kq_block: Optional[slice] = None,
                    rel_threshold: float = 0.1) -> dict:
  """Per-head pattern metrics of a layer's merged matrices.

  kq [N, D, D] (score = z_kv^T KQ_h z_q), ov [N, D, n_out]. `kq_block`
  selects the square sub-block the diagonal metrics use (e.g. slice(0, d)
  for the covariate block of an in-context regression token). Returns lists
  (one entry per head) and layer-level summaries:
    kq_diag_ratio, kq_diag_mean, kq_diag_norm_var, ov_last_entry_ratio,
    ov_last_entry, active, num_active, ov_last_zero_sum (over active heads),
    and their means over active heads.
  """
  kq, ov = _np(kq), _np(ov)
  if kq.ndim != 3 or ov.ndim != 3 or kq.shape[0] != ov.shape[0]:
    raise ValueError(
        f"`kq` must be [N, D, D] and `ov` [N, D, n_out], got {kq.shape}, "
        f"{ov.shape}.")
  sub = kq if kq_block is None else kq[:, kq_block, kq_block]
  ovf = ov.reshape(ov.shape[0], -1) if ov.shape[-1] == 1 else ov[..., 0]
  act = active_heads(ov, rel_threshold)
  dr = diagonal_ratio(sub)
  nv = normalized_diagonal_variance(sub)
  lr = last_entry_ratio(ovf)
  last = ovf[:, -1]
  return {
      "kq_diag_ratio": dr.tolist(),
      "kq_diag_mean": diagonal_mean(sub).tolist(),
      "kq_diag_norm_var": nv.tolist(),
      "ov_last_entry_ratio": lr.tolist(),
      "ov_last_entry": last.tolist(),
      "active": act.tolist(),
      "num_active": int(act.sum()),
      "ov_last_zero_sum": zero_sum_ratio(last, act),
      "mean_active_kq_diag_ratio": float(dr[act].mean()),
      "mean_active_kq_diag_norm_var": float(nv[act].mean()),
      "mean_active_ov_last_entry_ratio": float(lr[act].mean()),
  }


__all__ = [
    "active_heads", "block", "diagonal", "diagonal_mean", "diagonal_ratio",
    "head_norms", "head_selectivity", "last_entry_ratio", "matrix_cosine",
    "normalized_diagonal_variance", "summarize_heads", "zero_sum_ratio",
]
