"""Spatial attention family: attention over images and volumes.

Primitives take `[batch, *spatial, heads, head_dim]`; each has a plain-jnp
`*_reference`. Layers take channels-last feature maps `[B, H, W, C]` and own
their projections as the original papers do. See docs/spatial.md.
"""

from attnjax.spatial.neighborhood import (NeighborhoodAttention,
                                          neighborhood_attention,
                                          neighborhood_attention_reference,
                                          neighborhood_mask,
                                          neighborhood_window_start)
from attnjax.spatial.window import (GridAttention, WindowAttention,
                                    grid_attention, grid_attention_reference,
                                    relative_position_index,
                                    resize_relative_position_bias,
                                    window_attention,
                                    window_attention_reference)

__all__ = [
    "GridAttention", "WindowAttention", "grid_attention",
    "grid_attention_reference", "relative_position_index",
    "resize_relative_position_bias", "window_attention",
    "window_attention_reference",
    "NeighborhoodAttention", "neighborhood_attention",
    "neighborhood_attention_reference", "neighborhood_mask",
    "neighborhood_window_start",
]
