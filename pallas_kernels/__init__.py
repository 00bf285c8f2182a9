"""Pallas (and jax-triton) attention kernels.

Kernels never import attnjax; attnjax selects them with
`implementation='pallas'` / `'triton'`. Every kernel has a plain-jnp
`*_reference` beside it. `interpret=None` means interpret mode on CPU.
See docs/kernels.md.
"""

from pallas_kernels import aot
from pallas_kernels.block_sparse import (block_sparse_attention,
                                         block_sparse_attention_reference,
                                         causal_block_layout,
                                         layout_from_mask, local_block_layout,
                                         visited_fraction)
from pallas_kernels.flash import BlockSizes, flash_attention, mha_reference
from pallas_kernels.linear_attention import (
    causal_linear_attention, causal_linear_attention_reference)
from pallas_kernels.neighborhood import (neighborhood_attention,
                                         neighborhood_attention_reference)
from pallas_kernels.triton_flash import (triton_available,
                                         triton_flash_attention)

__all__ = [
    "aot", "BlockSizes", "block_sparse_attention", "block_sparse_attention_reference",
    "causal_block_layout", "causal_linear_attention",
    "causal_linear_attention_reference", "flash_attention",
    "layout_from_mask", "local_block_layout", "mha_reference",
    "neighborhood_attention", "neighborhood_attention_reference",
    "triton_available", "triton_flash_attention", "visited_fraction",
]
