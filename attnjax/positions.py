"""Position encodings for attention as pure functions, with layer options.

Rotary position embeddings (RoPE, Su et al. 2021, "RoFormer"):
  `rope_frequencies(dim, base)`    theta_i = base^(-2i / dim), i < dim / 2
  `apply_rope(x, positions)`        x [..., T, N, H]; positions [..., T]
                                    (1D) or [..., T, A] (axial over A axes)
  `apply_rope_2d(x)`               images x [B, H, W, N, D]: 2D axial RoPE
                                    on the (row, column) grid

  A pair of channels (a, b) at position p is rotated by the angle p theta_i:
    a' = a cos(p theta_i) - b sin(p theta_i)
    b' = a sin(p theta_i) + b cos(p theta_i)
  so q_m . k_n depends on the positions only through m - n. Two pairings of
  the channels are in use and both are named here:
    convention="half"         pair i = (i, i + R/2) (GPT-NeoX, HF LLaMA,
                              `flax.nnx.RoPE`'s rotate-half)
    convention="interleaved"  pair i = (2i, 2i + 1) (RoFormer, GPT-J, Meta's
                              LLaMA complex-number form)
  The same weights give different functions under the two conventions (they
  differ by a fixed permutation of the channels).
  `fraction` < 1 rotates only the first R = fraction * H channels (rounded
  down to a multiple of 2 A) and passes the rest through (GPT-NeoX's
  `rotary_pct`). Axial RoPE over A axes splits the R rotated channels into
  A equal consecutive groups; group a is rotated by the position along axis
  a with its own frequencies theta_i = base^(-2i / (R / A)) (RoPE-Axial of
  Heo et al. 2024, EVA-02).

ALiBi (Press et al. 2022, "Train Short, Test Long"):
  `alibi_slopes(num_heads)`        m_h = 2^(-8 h / n), h = 1..n, n a power of
                                    2; otherwise the slopes of the closest
                                    power of 2 below, then every other slope
                                    of twice that count (the paper's rule)
  `alibi_bias(num_heads, q_pos, k_pos, mode)`  [N, T, S] additive bias
    mode="causal":     -m_h (i - j)    (use with a causal mask; the paper's
                                        decoder form)
    mode="symmetric":  -m_h |i - j|    (bidirectional encoders)

Layer options (`attnjax.MultiHeadAttention(..., positions=...)`):
  `Rotary(base, fraction, convention, axes)` rotates the projected queries
  and keys; `ALiBi(mode)` adds its bias to the logits. Both take the
  layer's query/key positions, which under decoding with a KV cache are the
  absolute positions `cache_index + arange(L)`, so RoPE + KV cache works.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

CONVENTIONS = ("half", "interleaved")
ALIBI_MODES = ("causal", "symmetric")


def _check_convention(convention):
  if convention not in CONVENTIONS:
    raise ValueError(
        f"`convention` must be one of {CONVENTIONS}, got {convention!r}.")


def _check_base(base):
  if not (isinstance(base, (int, float, np.integer, np.floating))
          and not isinstance(base, bool) and base > 1):
    raise ValueError(f"`base` must be a number > 1, got {base!r}.")
  return float(base)


def rope_frequencies(dim: int, base: float = 10000.0) -> jax.Array:
  """[dim // 2] float32 angular frequencies theta_i = base^(-2i / dim)."""
  if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or (
      dim < 2 or dim % 2):
    raise ValueError(f"`dim` must be a positive even int, got {dim!r}.")
  base = _check_base(base)
  i = np.arange(dim // 2, dtype=np.float64)
  return jnp.asarray(base ** (-2.0 * i / dim), jnp.float32)


def rotary_dims(head_dim: int, fraction: float = 1.0, axes: int = 1) -> int:
  """Number R of rotated channels: fraction * head_dim rounded down to a
  multiple of 2 * axes."""
  if not (isinstance(fraction, (int, float, np.floating))
          and not isinstance(fraction, bool) and 0.0 < fraction <= 1.0):
    raise ValueError(f"`fraction` must be in (0, 1], got {fraction!r}.")
  step = 2 * axes
  r = int(math.floor(fraction * head_dim + 1e-9)) // step * step
  if r == 0:
    raise ValueError(
        f"`fraction`={fraction} of head_dim={head_dim} leaves no channel "
        f"pair to rotate on each of {axes} axis/axes (needs >= {step} "
        "channels).")
  return r


def _rotate(x, angles, convention):
  """Rotates channel pairs of x [..., R] (float32) by angles [..., R / 2]."""
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  half = x.shape[-1] // 2
  if convention == "half":
    a, b = x[..., :half], x[..., half:]
    return jnp.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)
  a, b = x[..., 0::2], x[..., 1::2]
  return jnp.stack([a * cos - b * sin, a * sin + b * cos],
                   axis=-1).reshape(x.shape)


def apply_rope(x, positions=None, *, base: float = 10000.0,
               fraction: float = 1.0, convention: str = "half",
               offset=0):
  """Rotary position embedding of x [..., T, N, H].

  Args:
    x: queries or keys [..., T, N, H] (any leading dims; N heads).
    positions: token positions, int or float: [..., T] (or [T]) for 1D RoPE,
      [..., T, A] (or [T, A]) for axial RoPE over A axes. Default arange(T).
      A rank-(x.ndim - 2) array whose last dim is T is read as 1D positions;
      give axial positions a batch dim ([1, T, A]) if that is ambiguous.
    base: frequency base (10000 in RoFormer/LLaMA).
    fraction: share of the H channels rotated (the first R of them).
    convention: "half" (pairs i, i + R/2) or "interleaved" (pairs 2i, 2i+1).
    offset: added to the positions (e.g. a KV-cache index).

  Returns:
    Same shape and dtype as x (rotation computed in float32).
  """
  x = jnp.asarray(x)
  _check_convention(convention)
  if x.ndim < 3:
    raise ValueError(
        f"`x` must be [..., T, N, H] (rank >= 3), got shape {tuple(x.shape)}.")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"`x` must be floating point, got dtype {x.dtype}.")
  t, h = x.shape[-3], x.shape[-1]
  if positions is None:
    positions = jnp.arange(t)
  positions = jnp.asarray(positions)
  if positions.ndim >= 1 and positions.shape[-1] == t and (
      positions.ndim == 1 or positions.ndim == x.ndim - 2):
    axial = False            # [..., T]
  elif positions.ndim >= 2 and positions.shape[-2] == t:
    axial = True             # [..., T, A]
  else:
    raise ValueError(
        f"`positions` must be [..., T] or [..., T, A] with T={t} (x shape "
        f"{tuple(x.shape)}), got shape {tuple(positions.shape)}.")
  naxes = positions.shape[-1] if axial else 1
  r = rotary_dims(h, fraction, naxes)
  return _rope(x, positions, jnp.asarray(offset), base=_check_base(base),
               r=r, axial=axial, convention=convention)


@functools.partial(jax.jit, static_argnames=("base", "r", "axial",
                                             "convention"))
def _rope(x, positions, offset, *, base, r, axial, convention):
  pos = positions.astype(jnp.float32) + offset.astype(jnp.float32)
  if not axial:
    pos = pos[..., None]
  naxes = pos.shape[-1]
  per = r // naxes
  freqs = rope_frequencies(per, base)                   # [per / 2]
  angles = pos[..., :, :, None] * freqs                 # [..., T, A, per/2]
  xf = x.astype(jnp.float32)
  parts = []
  for a in range(naxes):
    ang = angles[..., a, :][..., None, :]               # [..., T, 1, per/2]
    parts.append(_rotate(xf[..., a * per:(a + 1) * per], ang, convention))
  out = jnp.concatenate(parts + [xf[..., r:]], axis=-1)
  return out.astype(x.dtype)


def grid_positions(*spatial) -> jax.Array:
  """[prod(spatial), len(spatial)] int32 row-major coordinates of a grid."""
  grids = jnp.meshgrid(*[jnp.arange(s) for s in spatial], indexing="ij")
  return jnp.stack([g.reshape(-1) for g in grids], axis=-1).astype(jnp.int32)


def apply_rope_2d(x, *, base: float = 100.0, fraction: float = 1.0,
                  convention: str = "half", positions=None):
  """2D axial RoPE of image queries/keys x [B, H, W, N, D].

  The first R/2 rotated channels turn with the row index, the next R/2
  with the column index (`apply_rope` with A = 2 axes). `positions`
  [H, W, 2] or [B, H, W, 2] overrides the integer grid (e.g. rescaled
  coordinates). The default base 100 follows Heo et al. 2024 (RoPE for ViT).
  """
  x = jnp.asarray(x)
  if x.ndim != 5:
    raise ValueError(
        f"`x` must be [B, H, W, N, D], got shape {tuple(x.shape)}.")
  b, hh, ww, n, d = x.shape
  if positions is None:
    pos = grid_positions(hh, ww)                        # [H*W, 2]
  else:
    positions = jnp.asarray(positions)
    if positions.shape[-3:] != (hh, ww, 2) or positions.ndim not in (3, 4):
      raise ValueError(
          f"`positions` must be [H, W, 2] or [B, H, W, 2] with H={hh}, "
          f"W={ww}, got shape {tuple(positions.shape)}.")
    pos = positions.reshape(positions.shape[:-3] + (hh * ww, 2))
  out = apply_rope(x.reshape(b, hh * ww, n, d), pos, base=base,
                   fraction=fraction, convention=convention)
  return out.reshape(x.shape)


def alibi_slopes(num_heads: int) -> jax.Array:
  """[num_heads] float32 ALiBi slopes (Press et al. 2022).

  n a power of 2: m_h = 2^(-8 h / n), h = 1..n. Otherwise, with
  p = 2^floor(log2 n): the p slopes of p heads, then the slopes of 2p heads
  at odd h (every other one) up to n in all.
  """
  if isinstance(num_heads, bool) or not isinstance(
      num_heads, (int, np.integer)) or num_heads < 1:
    raise ValueError(f"`num_heads` must be a positive int, got {num_heads!r}.")
  n = int(num_heads)

  def pow2(k):
    return [2.0 ** (-8.0 * h / k) for h in range(1, k + 1)]

  p = 2 ** int(math.floor(math.log2(n)))
  slopes = pow2(p)
  if p < n:
    slopes += pow2(2 * p)[0::2][:n - p]
  return jnp.asarray(slopes, jnp.float32)


def alibi_bias(num_heads: int, query_positions, key_positions=None, *,
               mode: str = "causal", slopes=None):
  """ALiBi additive bias [..., N, T, S] float32.

  Args:
    num_heads: N.
    query_positions: [..., T] (or an int T for arange(T)).
    key_positions: [..., S] (or an int S); default: the query positions.
    mode: "causal" (-m (i - j); pair with a causal mask) or "symmetric"
      (-m |i - j|).
    slopes: [N] override (default `alibi_slopes(num_heads)`).
  """
  if mode not in ALIBI_MODES:
    raise ValueError(f"`mode` must be one of {ALIBI_MODES}, got {mode!r}.")
  m = alibi_slopes(num_heads) if slopes is None else jnp.asarray(
      slopes, jnp.float32)
  if m.shape != (num_heads,):
    raise ValueError(
        f"`slopes` must have shape ({num_heads},), got {tuple(m.shape)}.")
  qp = (jnp.arange(query_positions) if isinstance(query_positions, int)
        else jnp.asarray(query_positions))
  kp = qp if key_positions is None else (
      jnp.arange(key_positions) if isinstance(key_positions, int)
      else jnp.asarray(key_positions))
  if qp.ndim < 1 or kp.ndim < 1:
    raise ValueError(
        "`query_positions` and `key_positions` must be [..., T] / [..., S], "
        f"got shapes {tuple(qp.shape)} and {tuple(kp.shape)}.")
  dist = (qp.astype(jnp.float32)[..., :, None] -
          kp.astype(jnp.float32)[..., None, :])          # [..., T, S]
  if mode == "symmetric":
    dist = jnp.abs(dist)
  return -m[:, None, None] * dist[..., None, :, :]


# ----------------------------------------------------------------- layer hooks


@dataclasses.dataclass(frozen=True)
class PositionEncoding:
  """Base of the `positions=` option of `attnjax.MultiHeadAttention`.

  A subclass overrides `rotate(q, k, q_pos, k_pos)` (queries/keys after the
  projections, [B, T, N, H] / [B, S, K, H]; positions [B, T] / [B, S], or
  [B, T, A] / [B, S, A] for axial encodings) and/or `bias(num_heads, q_pos,
  k_pos)` (additive [B, N, T, S] logit bias, or None).
  """

  def rotate(self, query, key, query_positions, key_positions):
    return query, key

  def bias(self, num_heads, query_positions, key_positions):
    return None


@dataclasses.dataclass(frozen=True)
class Rotary(PositionEncoding):
  """RoPE on the projected queries and keys (see `apply_rope`).

  axes=2 with positions [B, T, 2] is 2D axial RoPE for image tokens
  (`grid_positions(h, w)` gives the row-major grid).
  """
  base: float = 10000.0
  fraction: float = 1.0
  convention: str = "half"
  axes: int = 1

  def __post_init__(self):
    _check_convention(self.convention)
    _check_base(self.base)
    if isinstance(self.axes, bool) or not isinstance(
        self.axes, (int, np.integer)) or self.axes < 1:
      raise ValueError(f"`axes` must be a positive int, got {self.axes!r}.")
    if not (isinstance(self.fraction, (int, float, np.floating))
            and not isinstance(self.fraction, bool)
            and 0.0 < self.fraction <= 1.0):
      raise ValueError(f"`fraction` must be in (0, 1], got {self.fraction!r}.")

  def rotate(self, query, key, query_positions, key_positions):
    kw = dict(base=self.base, fraction=self.fraction,
              convention=self.convention)
    return (apply_rope(query, query_positions, **kw),
            apply_rope(key, key_positions, **kw))


@dataclasses.dataclass(frozen=True)
class ALiBi(PositionEncoding):
  """ALiBi bias on the logits (see `alibi_bias`)."""
  mode: str = "causal"

  def __post_init__(self):
    if self.mode not in ALIBI_MODES:
      raise ValueError(
          f"`mode` must be one of {ALIBI_MODES}, got {self.mode!r}.")

  def bias(self, num_heads, query_positions, key_positions):
    return alibi_bias(num_heads, query_positions, key_positions,
                      mode=self.mode)


__all__ = [
    "ALiBi", "CONVENTIONS", "PositionEncoding", "Rotary", "alibi_bias",
    "alibi_slopes", "apply_rope", "apply_rope_2d", "grid_positions",
    "rope_frequencies", "rotary_dims",
]
