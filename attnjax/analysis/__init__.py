"""Attention-pattern analysis.

* `kq_ov`: merged KQ/OV matrix metrics.
* `head_stats`: entropy, effective rank, sink scores / sink rate, head
  divergence, head importance of recorded attention maps.
* `rollout`: attention rollout and attention flow (ViTs).
* `token_pruning`: budgeted attention-guided token selection (HiRED-style).
* `head_gates`: head importance from per-head gate gradients and head
  pruning (Michel et al. 2019) on MultiHeadAttention layers.
* `sink_geometry`: reference-frame measurements of attention sinks
  (Ruscio et al. 2025, "What are you sinking?").
* `visual_sinks`: sink dimensions and visual sink tokens (Kang et al.
  2025, "See What You Are Told").

Maps come from `attnjax.models.vision.attention_maps(model, images)`
({block path: [B, heads, T, S]}).
"""

from attnjax.analysis import (head_gates, head_stats, kq_ov, rollout,
                              sink_geometry, token_pruning, visual_sinks)
from attnjax.analysis.head_gates import (HeadGate, gated_layers, gated_view,
                                         head_importance, prune_heads,
                                         pruning_curve)
from attnjax.analysis.head_stats import (attention_entropy, effective_rank,
                                         gate_importance, head_divergence,
                                         head_entropy, ordered_layers,
                                         sink_rate, sink_scores)
from attnjax.analysis.rollout import (attention_flow, attention_rollout,
                                      fuse_heads)
from attnjax.analysis.sink_geometry import (attention_graph_stats,
                                            reference_decomposition,
                                            reference_tokens, sink_kl)
from attnjax.analysis.visual_sinks import (find_sink_dimensions,
                                           hidden_states, image_centric_heads,
                                           rms_normalized,
                                           sink_dimension_values,
                                           visual_sink_attention,
                                           visual_sink_tokens)
from attnjax.analysis.token_pruning import (allocate_budget, cls_attention,
                                            drop_tokens, select_tokens)

__all__ = ["kq_ov", "head_stats", "rollout", "token_pruning", "head_gates",
           "HeadGate", "gated_layers", "gated_view", "head_importance",
           "prune_heads", "pruning_curve", "gate_importance",
           "attention_entropy", "effective_rank", "head_divergence",
           "head_entropy", "ordered_layers", "sink_rate",
           "sink_scores", "attention_flow", "attention_rollout", "fuse_heads",
           "allocate_budget", "cls_attention", "drop_tokens", "select_tokens",
           "sink_geometry", "visual_sinks", "attention_graph_stats",
           "reference_decomposition", "reference_tokens", "sink_kl",
           "find_sink_dimensions", "hidden_states", "image_centric_heads",
           "rms_normalized", "sink_dimension_values", "visual_sink_attention",
           "visual_sink_tokens"]
