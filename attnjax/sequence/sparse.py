"""Sliding-window and block-sparse softmax attention with linear cost.

`sliding_window_attention`: query i sees keys in [i - left, i + right]
(`window_size` int w = (w, w); causal forces right = 0). Only the key blocks
that intersect each query block's band are gathered, so cost is
O(T (block + left + right) H) rather than O(T S H).

`block_sparse_attention`: an explicit block layout [nq_blocks, nk_blocks]
(or [B|1, N|1, nq_blocks, nk_blocks]), True = query block may attend key
block; each query block gathers only its True key blocks (at most
`max_blocks_per_row`, by default the densest row of a concrete layout).

References: `attnjax.dot_product_attention` with the equivalent dense mask.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from attnjax import masks as masks_lib
from attnjax._checks import normalize_window
from attnjax._dispatch import BackendConfig, Op
from attnjax.sequence import _common
from attnjax.sequence._gather import gathered_attention
from attnjax.softmax import dot_product_attention

SUPPORT_SLIDING_WINDOW = {
    "noncausal_self": True, "causal_self": True,
    "noncausal_cross": True, "causal_cross": True,
}
SUPPORT_BLOCK_SPARSE = dict(SUPPORT_SLIDING_WINDOW)

DEFAULT_BLOCK = 64


@dataclasses.dataclass(frozen=True)
class Xla(BackendConfig):
  """`implementation='xla'`: gathered key blocks (both ops)."""
  backend: ClassVar[str] = "xla"


@dataclasses.dataclass(frozen=True)
class Pallas(BackendConfig):
  """`implementation='pallas'`: the flash kernels (both ops); interpret=None
  means Pallas interpret mode on CPU."""
  backend: ClassVar[str] = "pallas"
  interpret: Optional[bool] = None


class BandCall(NamedTuple):
  """A validated sliding_window_attention call, as its backends get it."""
  query: jax.Array
  key: jax.Array
  value: jax.Array
  kv_mask: Optional[jax.Array]   # [B, S] bool, or None
  left: int
  right: int                     # 0 when causal
  is_causal: bool
  scale: float
  block_size: Optional[int]


class LayoutCall(NamedTuple):
  """A validated block_sparse_attention call, as its backends get it."""
  query: jax.Array
  key: jax.Array
  value: jax.Array
  kv_mask: Optional[jax.Array]
  layout: jax.Array              # bool [B|1, N|1, nq_blocks, nk_blocks]
  raw_layout: object             # as given (concrete or traced)
  block_q: int
  block_kv: int
  is_causal: bool
  scale: float
  max_blocks_per_row: Optional[int]


# None/'auto' runs 'xla' for both (the kernels are used when asked for).
SLIDING_WINDOW_OP = Op("sliding_window_attention",
                       auto_order=lambda call: ["xla"])
BLOCK_SPARSE_OP = Op("block_sparse_attention",
                     auto_order=lambda call: ["xla"])


def _common_checks(query, key, value, mask, bias, dropout_rate, mechanism):
  _common.reject("bias", bias, mechanism, "only key blocks are gathered; a "
                 "dense [T, S] bias would defeat the sparsity.")
  _common.reject("dropout_rate", dropout_rate, mechanism,
                 "attention dropout is not implemented for gathered blocks.")
  query, key, value, dims, unbatched = _common.prepare_qkv(query, key, value)
  b, t, n, s, k, h, hv = dims
  kv_mask = _common.key_padding_mask(mask, b, n, t, s, mechanism=mechanism,
                                     unbatched=unbatched)
  # Masked slots are zeroed by a select, so NaN/Inf there reaches nothing.
  key = _common.zero_masked(key, kv_mask)
  value = _common.zero_masked(value, kv_mask)
  return query, key, value, dims, unbatched, kv_mask


def sliding_window_attention(query, key, value, window_size, *,
                             is_causal: bool = False,
                             scale: Optional[float] = None,
                             block_size: Optional[int] = None, mask=None,
                             bias=None, dropout_rate: float = 0.0,
                             dropout_rng=None,
                             implementation=None):
  """Local softmax attention over a band of keys, linear in sequence length.

  Args:
    query: [B, T, N, H] (or [T, N, H]); key: [B, S, K, H]; value [B, S, K, Hv].
    window_size: int w or (left, right): query i sees keys i-left..i+right
      (top-left aligned positions, as `jax.nn.dot_product_attention`).
    is_causal: additionally j <= i.
    scale: default 1/sqrt(H).
    block_size: query/key block length (default min(64, left + right + 1)).
    mask: key-padding mask broadcastable to [B, 1, 1, S].
    implementation: None/'auto' (= 'xla'), 'xla' (gathered key blocks),
      'pallas' or `Pallas(interpret=...)` (`pallas_kernels.flash_attention`
      with the window: key tiles outside the band are never visited;
      `block_size` is then its tile size), or a sequence of these tried in
      order (`attnjax._dispatch`).

  Returns:
    [B, T, N, Hv] in query.dtype; rows with no key in reach are zeros.
  """
  del dropout_rng
  SLIDING_WINDOW_OP.resolve(implementation)
  query, key, value, dims, unbatched, kv_mask = _common_checks(
      query, key, value, mask, bias, dropout_rate, "sliding_window_attention")
  h = dims[5]
  if window_size is None:
    raise ValueError("`window_size` must be an int or (left, right), got None.")
  left, right = normalize_window(window_size)
  if is_causal:
    right = 0
  if block_size is not None:
    _common.check_positive_int("block_size", block_size)
  call = BandCall(query, key, value, kv_mask, left, right, bool(is_causal),
                  _common.default_scale(scale, h), block_size)
  if (empty := _common.empty_output(dims, query.dtype, unbatched)) is not None:
    return empty
  out = SLIDING_WINDOW_OP(implementation, call)
  return out[0] if unbatched else out


def _band_pallas(config: Optional[Pallas], call: BandCall):
  """pallas_kernels.flash_attention with the window: key tiles outside the
  band are never visited; `block_size` is its tile size."""
  from pallas_kernels import flash as pallas_flash
  sizes = None
  if call.block_size is not None:
    bs = int(call.block_size)
    sizes = pallas_flash.BlockSizes(bs, bs, bs, bs)
  return pallas_flash.flash_attention(
      call.query, call.key, call.value,
      local_window_size=(call.left, call.right), scale=call.scale,
      block_sizes=sizes,
      mask=None if call.kv_mask is None else call.kv_mask[:, None, None, :],
      interpret=None if config is None else config.interpret)


# Largest number of key blocks per query block for which `_band_xla` stacks
# the shifted key/value blocks (that many copies of K and V) and scans over
# them; wider bands gather inside the loop (`gathered_attention`).
_BAND_STACK_MAX_BLOCKS = 4


def _band_xla(config: Optional[Xla], call: BandCall):
  """Per query block, the key blocks its band touches.

  Query block a (positions a*bs .. a*bs + bs - 1) needs keys
  a*bs - left .. a*bs + bs - 1 + right: key blocks a + d .. a + d + top - 1
  with d = floor(-left / bs), the same offsets for every block. So the
  blocked keys and values, padded with invalid blocks at both ends, are cut
  into `top` shifted static slices and a scan walks the query blocks with
  their key windows as scanned inputs and outputs: nothing is gathered and
  nothing of sequence length is carried, so the backward pass (the
  transposes of slices are pads) stays linear in length. The gathered form
  carried the full-size key and value cotangents through its reverse loop,
  scatter-adding into them at every step (fwd+bwd ~S^1.15, issue 22). Bands
  wider than _BAND_STACK_MAX_BLOCKS blocks use the gathered form.
  """
  del config
  left, right = call.left, call.right
  t, s = call.query.shape[1], call.key.shape[1]
  bs = (max(1, min(DEFAULT_BLOCK, left + right + 1))
        if call.block_size is None else int(call.block_size))
  nqb, nkb = -(-t // bs), -(-s // bs)
  d = (-left) // bs
  top = (bs - 1 + right) // bs - d + 1
  if top > _BAND_STACK_MAX_BLOCKS:
    return _band_gathered(call, bs)
  b, _, n, h = call.query.shape
  k, hv = call.key.shape[2], call.value.shape[-1]
  g = n // k
  # Padded key blocks: p_lo invalid blocks before block 0, so that window
  # j of query block a is padded block a + d + j + p_lo (>= 0).
  p_lo = max(0, -d)
  p_hi = max(0, (nqb - 1) + d + (top - 1) - (nkb - 1))
  np_blocks = p_lo + nkb + p_hi
  tp = nqb * bs

  def blocked(x):
    x = jnp.pad(x, ((0, 0), (p_lo * bs, np_blocks * bs - p_lo * bs -
                             x.shape[1])) + ((0, 0),) * (x.ndim - 2))
    return x.reshape((b, np_blocks, bs) + x.shape[2:])

  key_ok = jnp.ones((b, s), bool) if call.kv_mask is None else call.kv_mask

  def windows(x):
    """[B, np_blocks, bs, ...] -> `top` arrays [nqb, B, bs, ...]: window j
    of every query block (static shifted slices, joined inside the loop)."""
    x = jnp.moveaxis(x, 1, 0)
    return tuple(x[d + j + p_lo:d + j + p_lo + nqb] for j in range(top))

  kw = windows(blocked(call.key))
  vw = windows(blocked(call.value))
  okw = windows(blocked(key_ok))
  qb = jnp.pad(call.query, ((0, 0), (0, tp - t), (0, 0), (0, 0)))
  qb = jnp.moveaxis(qb.reshape(b, nqb, bs, k, g, h), 1, 0)
  offs = jnp.arange(top * bs)                        # key offset in window
  qoff = jnp.arange(bs)

  def step(_, xs):
    qa, ka, va, oka, a = xs
    ka, va, oka = (jnp.concatenate(x, axis=1) for x in (ka, va, oka))
    logits = jnp.einsum("bqkgh,bskh->bkgqs", qa, ka,
                        preferred_element_type=jnp.float32) * call.scale
    qpos = a * bs + qoff                                   # [bs]
    kpos = (a + d) * bs + offs                             # [top * bs]
    rel = kpos[None, :] - qpos[:, None]                    # j - i
    ok = (qpos < t)[:, None] & (rel >= -left) & (rel <= right)
    if call.is_causal:
      ok = ok & (rel <= 0)
    ok = oka[:, None, None, None, :] & ok[None, None, None]
    p = _common.masked_softmax(logits, ok)
    out = jnp.einsum("bkgqs,bskd->bqkgd", p.astype(call.value.dtype), va,
                     preferred_element_type=jnp.float32)
    return None, out.reshape(b, bs, n, hv).astype(call.query.dtype)

  # jax.checkpoint: the backward pass recomputes a block's logits and
  # weights instead of storing them for every block.
  _, out = jax.lax.scan(jax.checkpoint(step), None,
                        (qb, kw, vw, okw, jnp.arange(nqb)))
  return jnp.moveaxis(out, 0, 1).reshape(b, tp, n, hv)[:, :t]


def _band_gathered(call: BandCall, bs: int):
  """Gathers, per query block, the key blocks its band touches."""
  left, right = call.left, call.right
  t, s = call.query.shape[1], call.key.shape[1]
  nqb, nkb = -(-t // bs), -(-s // bs)
  # Key blocks touching [a*bs - left, a*bs + bs - 1 + right].
  top = min(nkb, (bs - 1 + left + right) // bs + 2)
  # Shifting the start into [0, nkb - top] keeps the band covered (it spans
  # at most `top` in-range blocks) and the indices distinct.
  first = jnp.clip((jnp.arange(nqb) * bs - left) // bs, 0, nkb - top)
  idx = first[:, None] + jnp.arange(top)[None, :]
  valid = jnp.ones(idx.shape, bool)
  return gathered_attention(
      call.query, call.key, call.value, idx[None, None], valid[None, None],
      block_q=bs, block_k=bs, scale=call.scale, is_causal=call.is_causal,
      window=(left, right), kv_mask=call.kv_mask)


SLIDING_WINDOW_OP.register("xla", _band_xla, config_type=Xla)
SLIDING_WINDOW_OP.register("pallas", _band_pallas, config_type=Pallas)


def sliding_window_attention_reference(query, key, value, window_size, *,
                                       is_causal: bool = False,
                                       scale: Optional[float] = None,
                                       mask=None):
  """Dense softmax attention with the band mask (plain XLA backend)."""
  return dot_product_attention(query, key, value, mask=mask, scale=scale,
                               is_causal=is_causal,
                               local_window_size=window_size,
                               implementation="xla")


def _layout_4d(layout, b, n, nqb, nkb):
  layout = jnp.asarray(layout)
  if layout.dtype != jnp.bool_:
    raise ValueError(f"`layout` must be boolean, got dtype {layout.dtype}.")
  if layout.ndim not in (2, 4) or layout.shape[-2:] != (nqb, nkb):
    raise ValueError(
        f"`layout` must have shape [{nqb}, {nkb}] or [B|1, N|1, {nqb}, {nkb}] "
        f"(query/key blocks), got {layout.shape}.")
  if layout.ndim == 4 and (layout.shape[0] not in (1, b) or
                           layout.shape[1] not in (1, n)):
    raise ValueError(
        f"`layout` leading dims must be 1 or (batch={b}, heads={n}), got "
        f"{layout.shape}.")
  return layout.reshape((1,) * (4 - layout.ndim) + layout.shape)


def _block_sizes(block_size):
  if isinstance(block_size, (int, np.integer)):
    bs = _common.check_positive_int("block_size", block_size)
    return bs, bs
  try:
    bq, bk = block_size
  except (TypeError, ValueError):
    raise ValueError(
        f"`block_size` must be an int or (block_q, block_k), got {block_size!r}."
    ) from None
  return (_common.check_positive_int("block_size", bq),
          _common.check_positive_int("block_size", bk))


def block_sparse_attention(query, key, value, layout, block_size, *,
                           is_causal: bool = False,
                           scale: Optional[float] = None,
                           max_blocks_per_row: Optional[int] = None, mask=None,
                           bias=None, dropout_rate: float = 0.0,
                           dropout_rng=None,
                           implementation=None):
  """Softmax attention restricted to the True blocks of `layout`.

  Args:
    query, key, value: as `dot_product_attention`.
    layout: bool [nq_blocks, nk_blocks] or [B|1, N|1, nq_blocks, nk_blocks]
      with nq_blocks = ceil(T / block_q), nk_blocks = ceil(S / block_k).
    block_size: int or (block_q, block_k).
    is_causal: additionally j <= i inside the chosen blocks.
    max_blocks_per_row: static bound on True blocks per row; required when
      `layout` is traced (under jit; a row with more True blocks then keeps
      only its first `max_blocks_per_row`), else the densest row of the
      layout; a concrete layout with a denser row raises ValueError.
    mask: key-padding mask broadcastable to [B, 1, 1, S].
    implementation: None/'auto' (= 'xla'), 'xla' (gathered key blocks),
      'pallas' or `Pallas(interpret=...)` (`pallas_kernels.block_sparse_attention`:
      the flash kernels loop over each tile's True blocks only;
      `max_blocks_per_row` is not needed), or a sequence of these tried in
      order (`attnjax._dispatch`).

  Returns:
    [B, T, N, Hv] in query.dtype; rows with nothing to attend to are zeros.
  """
  del dropout_rng
  BLOCK_SPARSE_OP.resolve(implementation)
  query, key, value, dims, unbatched, kv_mask = _common_checks(
      query, key, value, mask, bias, dropout_rate, "block_sparse_attention")
  b, t, n, s, k, h, hv = dims
  bq, bk = _block_sizes(block_size)
  nqb, nkb = -(-t // bq), -(-s // bk)
  call = LayoutCall(query, key, value, kv_mask,
                    _layout_4d(layout, b, n, nqb, nkb), layout, bq, bk,
                    bool(is_causal), _common.default_scale(scale, h),
                    max_blocks_per_row)
  if (empty := _common.empty_output(dims, query.dtype, unbatched)) is not None:
    return empty
  out = BLOCK_SPARSE_OP(implementation, call)
  return out[0] if unbatched else out


def _layout_pallas(config: Optional[Pallas], call: LayoutCall):
  """pallas_kernels.block_sparse_attention: the flash kernels loop over
  each tile's True blocks only (`max_blocks_per_row` is not needed)."""
  from pallas_kernels import block_sparse as pallas_bs
  return pallas_bs.block_sparse_attention(
      call.query, call.key, call.value, call.layout, block_q=call.block_q,
      block_kv=call.block_kv, is_causal=call.is_causal, scale=call.scale,
      mask=None if call.kv_mask is None else call.kv_mask[:, None, None, :],
      interpret=None if config is None else config.interpret)


def _layout_xla(config: Optional[Xla], call: LayoutCall):
  """Gathers, per query block, its True key blocks (at most
  `max_blocks_per_row`)."""
  del config
  layout, raw_layout = call.layout, call.raw_layout
  nkb = layout.shape[-1]
  max_blocks_per_row = call.max_blocks_per_row
  traced = isinstance(raw_layout, jax.core.Tracer)
  densest = None if traced else int(np.max(np.sum(np.asarray(raw_layout), -1),
                                           initial=0))
  if max_blocks_per_row is None:
    if traced:
      raise ValueError(
          "`max_blocks_per_row` is required when `layout` is traced (jit).")
    max_blocks_per_row = max(1, densest)
  top = min(nkb, _common.check_positive_int("max_blocks_per_row",
                                            max_blocks_per_row))
  if densest is not None and densest > top:
    # Gathering only `top` blocks would silently drop the rest.
    raise ValueError(
        f"`layout` has a row with {densest} True blocks but "
        f"`max_blocks_per_row` is {max_blocks_per_row}; pass at least "
        f"{densest} (or None to size it from the layout).")
  # True blocks first, in increasing block order.
  prio = (jnp.where(layout, 2 * nkb, 0) -
          jnp.arange(nkb).reshape(1, 1, 1, nkb))
  _, idx = jax.lax.top_k(prio, top)
  valid = jnp.take_along_axis(layout, idx, axis=-1)
  return gathered_attention(
      call.query, call.key, call.value, idx, valid, block_q=call.block_q,
      block_k=call.block_kv, scale=call.scale, is_causal=call.is_causal,
      kv_mask=call.kv_mask)


BLOCK_SPARSE_OP.register("xla", _layout_xla, config_type=Xla)
BLOCK_SPARSE_OP.register("pallas", _layout_pallas, config_type=Pallas)


def block_sparse_attention_reference(query, key, value, layout, block_size, *,
                                     is_causal: bool = False,
                                     scale: Optional[float] = None, mask=None):
  """Dense softmax attention with `masks.block_mask(layout)`."""
  bq, bk = _block_sizes(block_size)
  t, s = query.shape[-3], key.shape[-3]
  dense = masks_lib.block_mask(layout, bq, bk, t, s)
  return dot_product_attention(query, key, value,
                               mask=masks_lib.and_masks(dense, mask),
                               scale=scale, is_causal=is_causal,
                               implementation="xla")
