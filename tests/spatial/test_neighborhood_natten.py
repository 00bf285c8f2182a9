"""neighborhood_attention against NATTEN itself (its `flex-fna` backend, which
runs forward on CPU): stride, dilation, per-axis causal, GQA, additional
key/value tokens and the log-sum-exp, 1D/2D/3D. Skipped where NATTEN (and
torch) are not installed: `pip install natten==0.21.7` builds without its
CUDA library when no CUDA toolkit is found (the 'reference' extra).
"""

import numpy as np
import pytest

natten = pytest.importorskip("natten")
torch = pytest.importorskip("torch")

import jax.numpy as jnp  # noqa: E402

from attnjax.spatial.neighborhood import neighborhood_attention  # noqa: E402

CASES = [
    # spatial, heads, kv heads, kernel, stride, dilation, causal, extra tokens
    ((23,), 4, 2, 5, 3, 2, True, 0),
    ((9, 10), 2, 2, (3, 4), (2, 3), (2, 1), (True, False), 3),
    ((4, 5, 6), 2, 1, (3, 2, 3), (2, 1, 3), (1, 2, 1), (False, True, False),
     2),
]


@pytest.mark.slow
@pytest.mark.parametrize("case", range(len(CASES)))
def test_matches_natten_flex_fna(case):
  spatial, n, kh, ks, st, dl, ca, m = CASES[case]
  rng = np.random.default_rng(case)
  q = rng.standard_normal((2,) + spatial + (n, 8)).astype(np.float32)
  k = rng.standard_normal((2,) + spatial + (kh, 8)).astype(np.float32)
  v = rng.standard_normal((2,) + spatial + (kh, 8)).astype(np.float32)
  ak = rng.standard_normal((2, m, kh, 8)).astype(np.float32) if m else None
  av = rng.standard_normal((2, m, kh, 8)).astype(np.float32) if m else None
  fn = {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}[len(spatial)]
  t = lambda x: None if x is None else torch.from_numpy(x)
  want, want_lse = fn(t(q), t(k), t(v), kernel_size=ks, stride=st,
                      dilation=dl, is_causal=ca, scale=0.3,
                      additional_keys=t(ak), additional_values=t(av),
                      backend="flex-fna", return_lse=True)
  j = lambda x: None if x is None else jnp.asarray(x)
  out, lse = neighborhood_attention(
      j(q), j(k), j(v), ks, stride=st, dilation=dl, is_causal=ca, scale=0.3,
      additional_keys=j(ak), additional_values=j(av), return_lse=True)
  np.testing.assert_allclose(out, want.numpy(), atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(lse, want_lse.numpy(), atol=2e-5, rtol=2e-5)
