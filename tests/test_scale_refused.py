"""A NaN or infinite `scale` is refused by every primitive (issue 15 item 6,
"scale=nan accepted everywhere").

`dot_product_attention`, `flash_attention` and the spatial layers' `qk_scale`
have their own tests (tests/test_softmax.py, tests/test_pallas_flash.py,
tests/test_spatial_validation.py); the sequence and spatial primitives take
their scale through the shared rule `pallas_kernels._rules.default_scale`,
which used to return float(nan) as is, so their outputs were silently all
NaN. Each call below is a ValueError naming `scale`.
"""

import functools

import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import sequence as sq
from attnjax import spatial as sp
from pallas_kernels._rules import default_scale

SEQ = jnp.ones((1, 8, 2, 4))
IMG = jnp.ones((1, 4, 4, 2, 4))

CALLS = {
    "agent": (functools.partial(sq.agent_attention, num_agents=2), SEQ),
    "based": (sq.based_attention, SEQ),
    "block_sparse": (functools.partial(sq.block_sparse_attention,
                                       layout=np.ones((2, 2), bool),
                                       block_size=4), SEQ),
    "efficient": (sq.efficient_attention, SEQ),
    "moba": (functools.partial(sq.moba_attention, block_size=4, top_k=1),
             SEQ),
    "multipole": (sq.multipole_attention, SEQ),
    "power": (sq.power_attention, SEQ),
    "routing": (functools.partial(sq.routing_attention, region_size=4,
                                  top_k=1), SEQ),
    "sliding_window": (functools.partial(sq.sliding_window_attention,
                                         window_size=1), SEQ),
    "window": (functools.partial(sp.window_attention, window_size=2), IMG),
    "channel": (sp.channel_attention, IMG),
    "grid": (functools.partial(sp.grid_attention, grid_size=2), IMG),
}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_nan_scale_is_refused_naming_it(name):
  fn, x = CALLS[name]
  with pytest.raises(ValueError, match="scale"):
    fn(x, x, x, scale=float("nan"))
  if name == "sliding_window":   # +-inf take the same path (the rule below)
    for bad in (np.inf, -np.inf):
      with pytest.raises(ValueError, match="scale"):
        fn(x, x, x, scale=bad)


def test_default_scale_rule():
  assert default_scale(None, 16) == 0.25
  assert default_scale(None, 0) == 1.0
  assert default_scale(np.float32(0.5), 16) == 0.5
  assert default_scale(0.0, 16) == 0.0      # zero is a valid scale
  for bad in (float("nan"), float("inf"), -float("inf")):
    with pytest.raises(ValueError, match="scale"):
      default_scale(bad, 16)
