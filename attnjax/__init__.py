"""attnjax: attention mechanisms for JAX and Flax NNX.

Pure functional primitives (layout of `jax.nn.dot_product_attention`:
query [B, T, N, H], key/value [B, S, K, H]) with an NNX layer for each, and
Pallas/Triton kernels behind `implementation=`.
"""

from attnjax import masks
from attnjax.softmax import (attention_weights, available_implementations,
                             dot_product_attention,
                             dot_product_attention_with_lse, register_backend)
from attnjax.nn import (MLP, MultiHeadAttention, TransformerBlock,
                        TransformerEncoder)

__version__ = "0.1.0"

__all__ = [
    "MLP", "MultiHeadAttention", "TransformerBlock", "TransformerEncoder",
    "attention_weights", "available_implementations", "dot_product_attention",
    "dot_product_attention_with_lse", "masks", "register_backend",
]
