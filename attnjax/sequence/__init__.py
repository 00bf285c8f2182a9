"""The sequence attention family: linear, random-feature, sparse, routed,
mixture-of-heads and higher-order attention.

Each mechanism has a pure function, a plain-jnp `*_reference`, and where it
needs parameters of its own an NNX layer. `SUPPORT[name]` says which of the
four patterns (noncausal/causal x self/cross) it supports; the rest raise
NotImplementedError saying why (docs/sequence.md has the table).
"""

from attnjax.sequence import linear as _linear
from attnjax.sequence._common import PATTERNS
from attnjax.sequence.linear import (linear_attention,
                                     linear_attention_reference)

SUPPORT = {
    "linear_attention": _linear.SUPPORT,
}

__all__ = [
    "PATTERNS", "SUPPORT", "linear_attention", "linear_attention_reference",
]
