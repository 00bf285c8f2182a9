"""Spatial attention family: attention over images and volumes.

Primitives take `[batch, *spatial, heads, head_dim]`; each has a plain-jnp
`*_reference` (dense attention with the mechanism's mask, the test oracle).
Layers take channels-last feature maps `[B, H, W, C]` and own their
projections as the original papers do. See docs/spatial.md.
"""

from attnjax.spatial.axial import (AxialAttention, axial_attention,
                                   axial_attention_reference)
from attnjax.spatial.atlas import (MultiScaleAttention,
                                   multiscale_bottom_up_attention,
                                   multiscale_bottom_up_attention_reference,
                                   multiscale_pyramid,
                                   multiscale_top_down_attention,
                                   multiscale_top_down_attention_reference)
from attnjax.spatial.boat import (BilateralLocalAttention,
                                  FeatureSpaceLocalAttention,
                                  feature_space_clusters,
                                  feature_space_local_attention,
                                  feature_space_local_attention_reference)
from attnjax.spatial.biformer import (BiLevelRoutingAttention,
                                      bi_level_routing_attention,
                                      bi_level_routing_attention_reference,
                                      region_routing)
from attnjax.spatial.channel import (ChannelAttention, channel_attention,
                                     channel_attention_reference)
from attnjax.spatial.coat import (FactorizedAttention, factorized_attention,
                                  factorized_attention_reference)
from attnjax.spatial.convit import (GPSA, convolutional_init,
                                    gated_positional_attention,
                                    gated_positional_attention_reference,
                                    relative_position_features)
from attnjax.spatial.crossformer import (CrossScaleEmbedding, DynamicPosBias,
                                         LSDAttention, lsda_attention,
                                         lsda_attention_reference)
from attnjax.spatial.crossvit import (CrossViTAttention, CrossViTFusion,
                                      cls_cross_attention,
                                      cls_cross_attention_reference)
from attnjax.spatial.cswin import (CSWinAttention,
                                   cross_shaped_window_attention,
                                   cross_shaped_window_attention_reference,
                                   stripe_attention)
from attnjax.spatial.dcal import (GlobalLocalCrossAttention,
                                  global_local_cross_attention,
                                  global_local_cross_attention_reference,
                                  select_local_queries)
from attnjax.spatial.ela import (EfficientLocalAttention,
                                 efficient_local_attention,
                                 efficient_local_attention_reference)
from attnjax.spatial.focalnet import (FocalModulation, focal_modulation,
                                      focal_modulation_reference)
from attnjax.spatial.halo import (HaloAttention, halo_attention,
                                  halo_attention_reference)
from attnjax.spatial.hat import (OverlappingCrossAttention,
                                 overlap_window_size,
                                 overlapping_cross_attention,
                                 overlapping_cross_attention_reference)
from attnjax.spatial.neighborhood import (NeighborhoodAttention,
                                          NeighborhoodPallas, NeighborhoodXLA,
                                          neighborhood_attention,
                                          neighborhood_attention_reference,
                                          neighborhood_mask,
                                          neighborhood_window_start)
from attnjax.spatial.ptv3 import (SerializedAttention, serialize,
                                  serialized_attention,
                                  serialized_attention_reference)
from attnjax.spatial.spherical import (SphericalAttention,
                                       sphere_grid, sphere_quadrature_weights,
                                       spherical_attention,
                                       spherical_attention_reference)
from attnjax.spatial.s2aformer import (HybridPerceptionBlock,
                                       StripSelfAttention, spatial_reduction,
                                       spatial_reduction_reference,
                                       strip_self_attention,
                                       strip_self_attention_reference)
from attnjax.spatial.strip import (CubicAttention, StripAttention,
                                   strip_attention, strip_attention_reference)
from attnjax.spatial.transnext import (AggregatedAttention,
                                       adaptive_avg_pool, aggregated_attention,
                                       aggregated_attention_reference,
                                       pool_relative_coords)
from attnjax.spatial.triplet import (TripletAttention, triplet_attention,
                                     triplet_attention_reference)
from attnjax.spatial.twins import (GlobalSubsampledAttention, HiLoAttention,
                                   LocallyGroupedAttention, average_pool,
                                   pooled_attention,
                                   pooled_attention_reference,
                                   subsampled_attention)
from attnjax.spatial.ulsam import ULSAM, ulsam, ulsam_reference
from attnjax.spatial.van import (LargeKernelAttention, VANAttention,
                                 large_kernel_attention,
                                 large_kernel_attention_reference)
from attnjax.spatial.window3d import (WindowAttention3D, video_window_size,
                                      window_3d_mask, window_attention_3d,
                                      window_attention_3d_reference)
from attnjax.spatial.window import (GridAttention, WindowAttention,
                                    grid_attention, grid_attention_reference,
                                    relative_position_index,
                                    resize_relative_position_bias,
                                    window_attention,
                                    window_attention_reference)

__all__ = [
    # neighborhood (NAT / DiNAT)
    "NeighborhoodAttention", "NeighborhoodPallas", "NeighborhoodXLA",
    "neighborhood_attention",
    "neighborhood_attention_reference", "neighborhood_mask",
    "neighborhood_window_start",
    # window / shifted window (Swin), block / grid (MaxViT)
    "GridAttention", "WindowAttention", "grid_attention",
    "grid_attention_reference", "relative_position_index",
    "resize_relative_position_bias", "window_attention",
    "window_attention_reference",
    # axial
    "AxialAttention", "axial_attention", "axial_attention_reference",
    # CSWin
    "CSWinAttention", "cross_shaped_window_attention",
    "cross_shaped_window_attention_reference", "stripe_attention",
    # Twins LSA / GSA, LITv2 HiLo
    "GlobalSubsampledAttention", "HiLoAttention", "LocallyGroupedAttention",
    "average_pool", "pooled_attention", "pooled_attention_reference",
    "subsampled_attention",
    # BiFormer
    "BiLevelRoutingAttention", "bi_level_routing_attention",
    "bi_level_routing_attention_reference", "region_routing",
    # DaViT
    "ChannelAttention", "channel_attention", "channel_attention_reference",
    # ConViT
    "GPSA", "convolutional_init", "gated_positional_attention",
    "gated_positional_attention_reference", "relative_position_features",
    # CrossViT
    "CrossViTAttention", "CrossViTFusion", "cls_cross_attention",
    "cls_cross_attention_reference",
    # Atlas multi-scale attention (MSA)
    "MultiScaleAttention", "multiscale_bottom_up_attention",
    "multiscale_bottom_up_attention_reference", "multiscale_pyramid",
    "multiscale_top_down_attention",
    "multiscale_top_down_attention_reference",
    # BOAT bilateral / feature-space local attention
    "BilateralLocalAttention", "FeatureSpaceLocalAttention",
    "feature_space_clusters", "feature_space_local_attention",
    "feature_space_local_attention_reference",
    # HaloNet
    "HaloAttention", "halo_attention", "halo_attention_reference",
    # Video Swin 3D windows
    "WindowAttention3D", "video_window_size", "window_3d_mask",
    "window_attention_3d", "window_attention_3d_reference",
    # CoaT
    "FactorizedAttention", "factorized_attention",
    "factorized_attention_reference",
    # TransNeXt
    "AggregatedAttention", "adaptive_avg_pool", "aggregated_attention",
    "aggregated_attention_reference", "pool_relative_coords",
    # VAN LKA, FocalNet
    "LargeKernelAttention", "VANAttention", "large_kernel_attention",
    "large_kernel_attention_reference", "FocalModulation", "focal_modulation",
    "focal_modulation_reference",
    # CrossFormer
    "CrossScaleEmbedding", "DynamicPosBias", "LSDAttention", "lsda_attention",
    "lsda_attention_reference",
    # SANet strip attention
    "CubicAttention", "StripAttention", "strip_attention",
    "strip_attention_reference",
    # S2AFormer strip self-attention
    "HybridPerceptionBlock", "StripSelfAttention", "spatial_reduction",
    "spatial_reduction_reference", "strip_self_attention",
    "strip_self_attention_reference",
    # DCAL GLCA, HAT OCAB
    "GlobalLocalCrossAttention", "global_local_cross_attention",
    "global_local_cross_attention_reference", "select_local_queries",
    "OverlappingCrossAttention", "overlap_window_size",
    "overlapping_cross_attention", "overlapping_cross_attention_reference",
    # CNN attention modules: triplet, ELA, ULSAM
    "TripletAttention", "triplet_attention", "triplet_attention_reference",
    "EfficientLocalAttention", "efficient_local_attention",
    "efficient_local_attention_reference", "ULSAM", "ulsam",
    "ulsam_reference",
    # attention on the sphere
    "SphericalAttention", "sphere_grid", "sphere_quadrature_weights",
    "spherical_attention", "spherical_attention_reference",
    # Point Transformer V3
    "SerializedAttention", "serialize", "serialized_attention",
    "serialized_attention_reference",
]
