"""Flax NNX layers built on attnjax primitives."""

from attnjax.nn.attention import MultiHeadAttention
from attnjax.nn.transformer import MLP, TransformerBlock, TransformerEncoder

__all__ = ["MLP", "MultiHeadAttention", "TransformerBlock", "TransformerEncoder"]
