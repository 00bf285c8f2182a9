"""The sequence attention family: linear, random-feature, sparse, routed,
mixture-of-heads and higher-order attention.

Each mechanism has a pure function, a plain-jnp `*_reference`, and an NNX
layer. `SUPPORT[name][pattern]` says which of the four patterns
(`PATTERNS`: noncausal/causal x self/cross) it supports; the others raise
NotImplementedError saying why. docs/sequence.md has the table (a test checks
it against this dict and against the functions' behaviour).
"""

from attnjax.sequence import (agent as _agent, efficient as _efficient,
                              higher_order as _higher_order, linear as _linear,
                              moba as _moba, moh as _moh,
                              performer as _performer, routing as _routing,
                              sparse as _sparse)
from attnjax.sequence._common import PATTERNS
from attnjax.sequence.agent import (agent_attention, agent_attention_reference,
                                    pool_agents)
from attnjax.sequence.efficient import (efficient_attention,
                                        efficient_attention_reference)
from attnjax.sequence.higher_order import (triplewise_attention,
                                           triplewise_attention_reference)
from attnjax.sequence.layers import (AgentAttention, EfficientAttention,
                                     LinearAttention, MoBAAttention,
                                     MoHAttention, PerformerAttention,
                                     RandomFeatures, RoutingAttention,
                                     SlidingWindowAttention,
                                     TriplewiseAttention)
from attnjax.sequence.linear import (FEATURE_MAPS, linear_attention,
                                     linear_attention_reference)
from attnjax.sequence import additive as _additive
from attnjax.sequence.gaussian_adaptive import (
    GaussianAdaptiveAttention, gaussian_adaptive_attention,
    gaussian_adaptive_attention_reference, gaussian_adaptive_weights)
from attnjax.sequence import rcmha as _rcmha
from attnjax.sequence.rcmha import (RCMHAttention, rcmha_attention,
                                    rcmha_attention_reference)
from attnjax.sequence import key_driven_gqa as _key_driven_gqa
from attnjax.sequence.key_driven_gqa import (
    KeyDrivenGQAttention, allocate_query_heads, ema_key_norms, key_driven_gqa,
    key_driven_gqa_reference, key_driven_head_groups, key_head_norms)
from attnjax.sequence import lambda_layer as _lambda_layer
from attnjax.sequence.lambda_layer import (LambdaLayer, lambda_attention,
                                          lambda_attention_2d,
                                          lambda_attention_2d_reference,
                                          lambda_attention_reference)
from attnjax.sequence.additive import (AdditiveAttention, PointerNetwork,
                                      additive_attention,
                                      additive_attention_reference,
                                      pointer_attention,
                                      pointer_attention_reference)
from attnjax.sequence.graph_attention import (
    GraphAttention, add_self_loops, gat_attention, gat_attention_reference,
    gatv2_attention, gatv2_attention_reference)
from attnjax.sequence.set_transformer import (
    ISAB, MAB, PMA, SAB, init_mab_params, isab, isab_reference, mab,
    mab_reference, pma, pma_reference, sab, sab_reference)
from attnjax.sequence import lightning as _lightning
from attnjax.sequence import based as _based
from attnjax.sequence import power as _power
from attnjax.sequence import mswa as _mswa
from attnjax.sequence import fast as _fast
from attnjax.sequence import multipole as _multipole
from attnjax.sequence.multipole import (MultipoleAttention, default_levels,
                                        multipole_attention,
                                        multipole_attention_reference)
from attnjax.sequence.fast import (FASTAttention, fast_attention,
                                   fast_attention_reference, fastmax_features)
from attnjax.sequence import routing_transformer as _routing_transformer
from attnjax.sequence.routing_transformer import (
    Centroids, RoutingTransformerAttention, init_centroids, kmeans_update,
    routing_assignments, routing_transformer_attention,
    routing_transformer_attention_reference)
from attnjax.sequence.mswa import (MSWAAttention, mswa_attention,
                                   mswa_attention_reference, mswa_window_sizes)
from attnjax.sequence.power import (PowerAttention, power_attention,
                                    power_attention_reference, power_layout)
from attnjax.sequence.based import (BasedAttention, based_attention,
                                    based_attention_reference,
                                    taylor_feature_map)
from attnjax.sequence.lightning import (LightningAttention,
                                        lightning_attention,
                                        lightning_attention_reference,
                                        retnet_decays)
from attnjax.sequence.moba import (moba_attention, moba_attention_reference,
                                   moba_selected_blocks)
from attnjax.sequence.moh import (mixture_of_heads_attention, moh_gates,
                                  moh_gates_reference)
from attnjax.sequence.performer import (favor_features,
                                        orthogonal_random_features,
                                        performer_attention,
                                        performer_attention_reference)
from attnjax.sequence.routing import (routing_attention,
                                      routing_attention_reference)
from attnjax.sequence.sparse import (block_sparse_attention,
                                     block_sparse_attention_reference,
                                     sliding_window_attention,
                                     sliding_window_attention_reference)

SUPPORT = {
    "linear_attention": _linear.SUPPORT,
    "efficient_attention": _efficient.SUPPORT,
    "performer_attention": _performer.SUPPORT,
    "sliding_window_attention": _sparse.SUPPORT_SLIDING_WINDOW,
    "block_sparse_attention": _sparse.SUPPORT_BLOCK_SPARSE,
    "moba_attention": _moba.SUPPORT,
    "routing_attention": _routing.SUPPORT,
    "agent_attention": _agent.SUPPORT,
    "mixture_of_heads_attention": _moh.SUPPORT,
    "triplewise_attention": _higher_order.SUPPORT,
    "lightning_attention": _lightning.SUPPORT,
    "based_attention": _based.SUPPORT,
    "power_attention": _power.SUPPORT,
    "mswa_attention": _mswa.SUPPORT,
    "routing_transformer_attention": _routing_transformer.SUPPORT,
    "fast_attention": _fast.SUPPORT,
    "multipole_attention": _multipole.SUPPORT,
    "additive_attention": _additive.SUPPORT,
    "rcmha_attention": _rcmha.SUPPORT,
    "key_driven_gqa": _key_driven_gqa.SUPPORT,
    "lambda_attention": _lambda_layer.SUPPORT,
}

__all__ = [
    "LambdaLayer", "lambda_attention", "lambda_attention_2d",
    "lambda_attention_2d_reference", "lambda_attention_reference",
    "KeyDrivenGQAttention", "allocate_query_heads", "ema_key_norms",
    "key_driven_gqa", "key_driven_gqa_reference", "key_driven_head_groups",
    "key_head_norms",
    "RCMHAttention", "rcmha_attention", "rcmha_attention_reference",
    "GaussianAdaptiveAttention", "gaussian_adaptive_attention",
    "gaussian_adaptive_attention_reference", "gaussian_adaptive_weights",
    "AdditiveAttention", "PointerNetwork", "additive_attention",
    "additive_attention_reference", "pointer_attention",
    "pointer_attention_reference",
    "GraphAttention", "add_self_loops", "gat_attention",
    "gat_attention_reference", "gatv2_attention", "gatv2_attention_reference",
    "ISAB", "MAB", "PMA", "SAB", "init_mab_params", "isab", "isab_reference",
    "mab", "mab_reference", "pma", "pma_reference", "sab", "sab_reference",
    "LightningAttention", "lightning_attention",
    "lightning_attention_reference", "retnet_decays",
    "BasedAttention", "based_attention", "based_attention_reference",
    "taylor_feature_map",
    "PowerAttention", "power_attention", "power_attention_reference",
    "power_layout",
    "MSWAAttention", "mswa_attention", "mswa_attention_reference",
    "mswa_window_sizes",
    "Centroids", "RoutingTransformerAttention", "init_centroids",
    "kmeans_update", "routing_assignments", "routing_transformer_attention",
    "routing_transformer_attention_reference",
    "FASTAttention", "fast_attention", "fast_attention_reference",
    "fastmax_features",
    "MultipoleAttention", "default_levels", "multipole_attention",
    "multipole_attention_reference",
    "AgentAttention", "EfficientAttention", "FEATURE_MAPS", "LinearAttention",
    "MoBAAttention", "MoHAttention", "PATTERNS", "PerformerAttention",
    "RandomFeatures", "RoutingAttention", "SUPPORT", "SlidingWindowAttention",
    "TriplewiseAttention", "agent_attention", "agent_attention_reference",
    "block_sparse_attention", "block_sparse_attention_reference",
    "efficient_attention", "efficient_attention_reference", "favor_features",
    "linear_attention", "linear_attention_reference",
    "mixture_of_heads_attention", "moba_attention", "moba_attention_reference",
    "moba_selected_blocks", "moh_gates", "moh_gates_reference",
    "orthogonal_random_features", "performer_attention",
    "performer_attention_reference", "pool_agents", "routing_attention",
    "routing_attention_reference", "sliding_window_attention",
    "sliding_window_attention_reference", "triplewise_attention",
    "triplewise_attention_reference",
]
