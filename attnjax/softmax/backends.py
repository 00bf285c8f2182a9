"""The `dot_product_attention` op: its backends, their config objects, and the
automatic order.

`OP` is the `attnjax._dispatch.Op` behind `dot_product_attention` and
`dot_product_attention_with_lse`. A backend is `fn(config, call, need_lse)
-> (out, lse)`: `config` is the user's config object (or None: defaults),
`call` an `AttentionCall` (validated, rank-4 inputs, static options), and
`lse` the [B, N, T] float32 log-sum-exp (-inf on empty rows) whenever
`need_lse`. A backend that cannot serve a call raises NotImplementedError
saying why.

Config objects (pass one as `implementation=`):

  Xla()                          the plain reference.
  Chunked(block_q, block_kv)     online softmax over blocks (pure JAX).
  Cudnn()                        jax.nn's cuDNN path (GPU).
  Pallas(block_q, block_kv, block_q_bwd, block_kv_bwd, interpret)
                                 pallas_kernels.flash_attention.
  Triton(block_q, block_kv, num_warps, num_stages, interpret)
                                 pallas_kernels.triton_flash_attention.

Unset (None) fields take the backend's per-platform defaults.

Adding a backend is one module that calls `OP.register(name, fn,
config_type=...)` (see docs/architecture.md for a worked example).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional

import jax
import numpy as np

from attnjax._dispatch import BackendConfig, Op
from attnjax.softmax import _auto
from attnjax.softmax import chunked as chunked_lib
from attnjax.softmax import cudnn as cudnn_lib
from attnjax.softmax import xla as xla_lib
from attnjax.softmax._common import AttentionCall

__all__ = ["OP", "Chunked", "Cudnn", "Pallas", "Triton", "Xla"]


def _check_sizes(config, names):
  """Config fields `names` must be None or positive ints (checked when the
  config is built, so a bad size is refused even for an empty call)."""
  for name in names:
    v = getattr(config, name)
    if v is not None and (isinstance(v, (bool, np.bool_)) or not isinstance(
        v, (int, np.integer)) or v <= 0):
      raise ValueError(
          f"`{name}` ({type(config).__name__}.{name}) must be a positive "
          f"int or None, got {v!r}.")


@dataclasses.dataclass(frozen=True)
class Xla(BackendConfig):
  """`implementation='xla'`: materializes the [B, N, T, S] logits."""
  backend: ClassVar[str] = "xla"


@dataclasses.dataclass(frozen=True)
class Chunked(BackendConfig):
  """`implementation='chunked'` with block sizes.

  block_q / block_kv: query and key/value block lengths (None: the
  per-platform `attnjax.softmax.chunked.default_blocks()`; capped at the
  sequence lengths rounded up to 8). Peak memory grows with
  block_q * block_kv, not T * S.
  """
  backend: ClassVar[str] = "chunked"
  block_q: Optional[int] = None
  block_kv: Optional[int] = None

  def __post_init__(self):
    _check_sizes(self, ("block_q", "block_kv"))


@dataclasses.dataclass(frozen=True)
class Cudnn(BackendConfig):
  """`implementation='cudnn'`: jax.nn.dot_product_attention's cuDNN path."""
  backend: ClassVar[str] = "cudnn"


@dataclasses.dataclass(frozen=True)
class Pallas(BackendConfig):
  """`implementation='pallas'` with tile sizes and interpret mode.

  Block fields left None take `pallas_kernels.BlockSizes.get_default` for
  the call's head dim and dtype; interpret=None means interpret mode on CPU.
  """
  backend: ClassVar[str] = "pallas"
  block_q: Optional[int] = None
  block_kv: Optional[int] = None
  block_q_bwd: Optional[int] = None
  block_kv_bwd: Optional[int] = None
  interpret: Optional[bool] = None

  def __post_init__(self):
    _check_sizes(self, ("block_q", "block_kv", "block_q_bwd",
                        "block_kv_bwd"))


@dataclasses.dataclass(frozen=True)
class Triton(BackendConfig):
  """`implementation='triton'` with tile/launch overrides (applied to all
  three kernels) and Triton's CPU interpreter (`interpret=True`, slow; for
  tests)."""
  backend: ClassVar[str] = "triton"
  block_q: Optional[int] = None
  block_kv: Optional[int] = None
  num_warps: Optional[int] = None
  num_stages: Optional[int] = None
  interpret: bool = False


def auto_order(call: AttentionCall, need_lse: bool):
  """The automatic order for a call.

  'xla' vs 'chunked' first: the measured per-platform crossover rule
  (`_auto`). The Pallas and Triton kernels are chosen only when asked for:
  they are verified in interpret mode on CPU but have not been run on a
  GPU/TPU in CI, so the automatic path uses the backends that have been.
  """
  del need_lse
  order = _auto.call_order(call)
  if jax.default_backend() == "gpu":
    return ["cudnn"] + order
  return order


OP = Op("dot_product_attention", auto_order=auto_order)


def _xla_backend(config: Optional[Xla], call: AttentionCall, need_lse: bool):
  del config
  return xla_lib.xla_attention(call, need_lse)


def _chunked_backend(config: Optional[Chunked], call: AttentionCall,
                     need_lse: bool):
  config = config or Chunked()
  # Looked up at call time so that a test can spy on `chunked_attention`.
  return chunked_lib.chunked_attention(call, block_q=config.block_q,
                                       block_kv=config.block_kv,
                                       need_lse=need_lse)


def _cudnn_backend(config: Optional[Cudnn], call: AttentionCall,
                   need_lse: bool):
  del config
  return cudnn_lib.cudnn_attention(call, need_lse=need_lse)


OP.register("xla", _xla_backend, config_type=Xla)
OP.register("chunked", _chunked_backend, config_type=Chunked)
OP.register("cudnn", _cudnn_backend, config_type=Cudnn)
# Kernels: their modules import pallas_kernels (and jax-triton) on first use;
# importing the module registers the backend.
OP.register("pallas", lazy="attnjax.softmax.pallas_backend",
            config_type=Pallas)
OP.register("triton", lazy="attnjax.softmax.triton_backend",
            config_type=Triton)
