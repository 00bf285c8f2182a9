"""Flax NNX layers built on attnjax primitives."""

from attnjax.nn.attention import MultiHeadAttention
from attnjax.nn.transformer import MLP, TransformerBlock, TransformerEncoder
from attnjax.positions import ALiBi, PositionEncoding, Rotary

__all__ = ["ALiBi", "MLP", "MultiHeadAttention", "PositionEncoding", "Rotary",
           "TransformerBlock", "TransformerEncoder"]
