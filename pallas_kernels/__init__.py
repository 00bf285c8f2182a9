"""Pallas (and jax-triton) attention kernels.

Kernels never import attnjax; attnjax selects them with
`implementation='pallas'` / `'triton'`. Every kernel has a plain-jnp
`*_reference` beside it. `interpret=None` means interpret mode on CPU.
"""

from pallas_kernels.flash import (BlockSizes, flash_attention,
                                            mha_reference)

__all__ = ["BlockSizes", "flash_attention", "mha_reference"]
