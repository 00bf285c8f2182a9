"""attnjax: attention mechanisms for JAX and Flax NNX.

Pure functional primitives (layout of `jax.nn.dot_product_attention`:
query [B, T, N, H], key/value [B, S, K, H]; spatial [B, *spatial, N, H]) with
an NNX layer for each, and Pallas/Triton kernels behind `implementation=`.

Families live in subpackages (`attnjax.sequence`, `attnjax.spatial`,
`attnjax.distributed`); the most used names are re-exported here.
"""

from attnjax import masks
from attnjax.softmax import (attention_weights, available_implementations,
                             chunked_dot_product_attention,
                             dot_product_attention,
                             dot_product_attention_with_lse, register_backend)
from attnjax.nn import (MLP, MultiHeadAttention, TransformerBlock,
                        TransformerEncoder)
from attnjax import sequence, spatial, distributed
from attnjax.sequence import linear_attention
from attnjax.spatial import neighborhood_attention
from attnjax.distributed import ring_attention, ulysses_attention

__version__ = "0.1.0"

__all__ = [
    "MLP", "MultiHeadAttention", "TransformerBlock", "TransformerEncoder",
    "attention_weights", "available_implementations",
    "chunked_dot_product_attention", "distributed", "dot_product_attention",
    "dot_product_attention_with_lse", "linear_attention", "masks",
    "neighborhood_attention", "register_backend", "ring_attention",
    "sequence", "spatial", "ulysses_attention",
]
