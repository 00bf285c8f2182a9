"""attnjax: attention mechanisms for JAX and Flax NNX.

Pure functional primitives (layout of `jax.nn.dot_product_attention`:
query [B, T, N, H], key/value [B, S, K, H]; spatial [B, *spatial, N, H]) with
an NNX layer for each, and Pallas/Triton kernels behind `implementation=`.

Families live in subpackages (`attnjax.sequence`, `attnjax.spatial`,
`attnjax.distributed`, `attnjax.analysis`); their primitives and layers are
re-exported here.
"""

from attnjax import masks
from attnjax.softmax import (attention_weights, available_implementations,
                             chunked_dot_product_attention,
                             dot_product_attention,
                             dot_product_attention_with_lse, merge_attentions,
                             register_backend)
# Backend config objects for `implementation=` (attnjax/_dispatch.py).
from attnjax._dispatch import BackendConfig
from attnjax.softmax import Chunked, Cudnn, Pallas, Triton, Xla
from attnjax.nn import (MLP, MultiHeadAttention, TransformerBlock,
                        TransformerEncoder)
from attnjax import positions
from attnjax.positions import (ALiBi, Rotary, alibi_bias, alibi_slopes,
                               apply_rope, apply_rope_2d)
from attnjax import analysis, distributed, sequence, spatial
from attnjax.sequence import (
    AgentAttention, EfficientAttention, LinearAttention, MoBAAttention,
    MoHAttention, PerformerAttention, RoutingAttention, SlidingWindowAttention,
    TriplewiseAttention, agent_attention, block_sparse_attention,
    efficient_attention, linear_attention, mixture_of_heads_attention,
    moba_attention, moh_gates, orthogonal_random_features, performer_attention,
    routing_attention, sliding_window_attention, triplewise_attention)
from attnjax.sequence import (  # issue 20: zoo B
    ISAB, MAB, PMA, SAB, AdditiveAttention, GaussianAdaptiveAttention,
    GraphAttention, KeyDrivenGQAttention, LambdaLayer, PointerNetwork,
    RCMHAttention, additive_attention, gat_attention, gatv2_attention,
    gaussian_adaptive_attention, isab, key_driven_gqa, lambda_attention,
    lambda_attention_2d, mab, pma, pointer_attention, rcmha_attention, sab)
from attnjax.sequence import (  # issue 20: zoo A
    BasedAttention, FASTAttention, LightningAttention, MSWAAttention,
    MultipoleAttention, PowerAttention, RoutingTransformerAttention,
    based_attention, fast_attention, kmeans_update, lightning_attention,
    mswa_attention, multipole_attention, power_attention, power_layout,
    routing_transformer_attention)
from attnjax.spatial import (
    GPSA, AxialAttention, BiLevelRoutingAttention, ChannelAttention,
    CrossViTAttention, CrossViTFusion, CSWinAttention,
    GlobalSubsampledAttention, GridAttention, HiLoAttention,
    LocallyGroupedAttention, NeighborhoodAttention, NeighborhoodPallas,
    NeighborhoodXLA, WindowAttention,
    axial_attention, bi_level_routing_attention, channel_attention,
    cross_shaped_window_attention, gated_positional_attention, grid_attention,
    neighborhood_attention, neighborhood_mask, resize_relative_position_bias,
    window_attention)
from attnjax.spatial import (  # spatial zoo (issue 21)
    AggregatedAttention, CubicAttention, EfficientLocalAttention,
    FactorizedAttention, FocalModulation, GlobalLocalCrossAttention,
    HaloAttention, LargeKernelAttention, LSDAttention,
    OverlappingCrossAttention, SerializedAttention, SphericalAttention,
    StripAttention, TripletAttention, ULSAM, VANAttention, WindowAttention3D,
    aggregated_attention, efficient_local_attention, factorized_attention,
    focal_modulation, global_local_cross_attention, halo_attention,
    large_kernel_attention, lsda_attention, overlapping_cross_attention,
    serialized_attention, spherical_attention, strip_attention,
    triplet_attention, ulsam, window_attention_3d)
from attnjax.spatial import (  # spatial zoo (issue 21): BOAT, Atlas
    BilateralLocalAttention, FeatureSpaceLocalAttention, MultiScaleAttention,
    feature_space_local_attention, multiscale_bottom_up_attention,
    multiscale_top_down_attention)
from attnjax.spatial import (  # spatial zoo (issue 21): S2AFormer
    HybridPerceptionBlock, StripSelfAttention, strip_self_attention)
from attnjax.distributed import (ring_attention, sequence_parallel_attention_fn,
                                 ulysses_attention)

__version__ = "0.1.0"

__all__ = [
    # core
    "masks", "attention_weights", "available_implementations",
    "chunked_dot_product_attention", "dot_product_attention",
    "dot_product_attention_with_lse", "merge_attentions", "register_backend",
    "BackendConfig", "Chunked", "Cudnn", "Pallas", "Triton", "Xla",
    "MLP", "MultiHeadAttention", "TransformerBlock", "TransformerEncoder",
    "analysis", "distributed", "sequence", "spatial",
    # positions (attnjax.positions)
    "positions", "ALiBi", "Rotary", "alibi_bias", "alibi_slopes", "apply_rope",
    "apply_rope_2d",
    # sequence family
    "AgentAttention", "EfficientAttention", "LinearAttention", "MoBAAttention",
    "MoHAttention", "PerformerAttention", "RoutingAttention",
    "SlidingWindowAttention", "TriplewiseAttention", "agent_attention",
    "block_sparse_attention", "efficient_attention", "linear_attention",
    "mixture_of_heads_attention", "moba_attention", "moh_gates",
    "orthogonal_random_features", "performer_attention", "routing_attention",
    "sliding_window_attention", "triplewise_attention",
    "ISAB", "MAB", "PMA", "SAB", "AdditiveAttention",
    "GaussianAdaptiveAttention", "GraphAttention", "KeyDrivenGQAttention",
    "LambdaLayer", "PointerNetwork", "RCMHAttention", "additive_attention",
    "gat_attention", "gatv2_attention", "gaussian_adaptive_attention", "isab",
    "key_driven_gqa", "lambda_attention", "lambda_attention_2d", "mab", "pma",
    "pointer_attention", "rcmha_attention", "sab",
    "BasedAttention", "FASTAttention", "LightningAttention", "MSWAAttention",
    "MultipoleAttention", "PowerAttention", "RoutingTransformerAttention",
    "based_attention", "fast_attention", "kmeans_update",
    "lightning_attention", "mswa_attention", "multipole_attention",
    "power_attention", "power_layout", "routing_transformer_attention",
    # spatial family
    "GPSA", "AxialAttention", "BiLevelRoutingAttention", "ChannelAttention",
    "CrossViTAttention", "CrossViTFusion", "CSWinAttention",
    "GlobalSubsampledAttention", "GridAttention", "HiLoAttention",
    "LocallyGroupedAttention", "NeighborhoodAttention", "NeighborhoodPallas",
    "NeighborhoodXLA", "WindowAttention",
    "axial_attention", "bi_level_routing_attention", "channel_attention",
    "cross_shaped_window_attention", "gated_positional_attention",
    "grid_attention", "neighborhood_attention", "neighborhood_mask",
    "resize_relative_position_bias", "window_attention",
    "AggregatedAttention", "CubicAttention", "EfficientLocalAttention",
    "FactorizedAttention", "FocalModulation", "GlobalLocalCrossAttention",
    "HaloAttention", "LargeKernelAttention", "LSDAttention",
    "OverlappingCrossAttention", "SerializedAttention", "SphericalAttention",
    "StripAttention", "TripletAttention", "ULSAM", "VANAttention",
    "WindowAttention3D", "aggregated_attention", "efficient_local_attention",
    "factorized_attention", "focal_modulation",
    "global_local_cross_attention", "halo_attention",
    "large_kernel_attention", "lsda_attention", "overlapping_cross_attention",
    "serialized_attention", "spherical_attention", "strip_attention",
    "triplet_attention", "ulsam", "window_attention_3d",
    "BilateralLocalAttention", "FeatureSpaceLocalAttention",
    "feature_space_local_attention", "MultiScaleAttention",
    "multiscale_bottom_up_attention", "multiscale_top_down_attention",
    "HybridPerceptionBlock", "StripSelfAttention", "strip_self_attention",
    # distributed
    "ring_attention", "sequence_parallel_attention_fn", "ulysses_attention",
]
