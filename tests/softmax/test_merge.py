"""`attnjax.merge_attentions` on its own: float64 NumPy reference of the lse
merge, -inf parts and rows, extreme magnitudes, layouts, bad arguments.
(Split-KV == whole attention, per backend: tests/softmax_base.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax
from tests.strict_modes import strict_mode


def _merge_np(outs, lses):
  """Float64, from the definition: lse = log sum_p exp(lse_p),
  out = sum_p exp(lse_p - lse) out_p (lses [B, N, T], outs [B, T, N, H]);
  rows where every part is -inf give out 0, lse -inf."""
  lses = np.stack([np.asarray(l, np.float64) for l in lses])   # [P, B, N, T]
  outs = np.stack([np.asarray(o, np.float64) for o in outs])   # [P, B, T, N, H]
  with np.errstate(invalid="ignore"):
    lse = np.logaddexp.reduce(lses, axis=0)
  w = np.where(np.isneginf(lses), 0.0,
               np.exp(lses - np.where(np.isneginf(lse), 0.0, lse)))
  w = np.swapaxes(w, -1, -2)[..., None]                        # [P, B, T, N, 1]
  out = np.sum(np.where(w > 0, w * np.nan_to_num(outs), 0.0), axis=0)
  return out, lse


def _parts(seed, p=3, b=2, t=5, n=3, h=4, scale=1.0):
  rng = np.random.default_rng(seed)
  outs = [rng.standard_normal((b, t, n, h)).astype(np.float32)
          for _ in range(p)]
  lses = [(rng.standard_normal((b, n, t)) * scale).astype(np.float32)
          for _ in range(p)]
  return outs, lses


def test_matches_reference_with_neg_inf_parts_and_rows():
  outs, lses = _parts(0)
  lses[1][0, :, 2] = -np.inf          # part 1 empty on one row
  outs[1][0, 2] = np.nan              # whatever it holds there is ignored
  for l in lses:
    l[1, 0, 4] = -np.inf              # a row empty in every part
  out, lse = attnjax.merge_attentions([jnp.asarray(o) for o in outs],
                                      [jnp.asarray(l) for l in lses])
  ref_out, ref_lse = _merge_np(outs, lses)
  assert np.all(np.isfinite(np.asarray(out)))
  np.testing.assert_allclose(np.asarray(out), ref_out, atol=1e-6, rtol=1e-5)
  np.testing.assert_array_equal(np.isneginf(np.asarray(lse)),
                                np.isneginf(ref_lse))
  fin = np.isfinite(ref_lse)
  np.testing.assert_allclose(np.asarray(lse)[fin], ref_lse[fin], rtol=1e-6)
  assert np.all(np.asarray(out)[1, 4, 0] == 0.0)
  # Gradients stay finite (also at the -inf entries) and match the closed
  # form d(sum out * g)/d out_p = w_p * g.
  g = np.random.default_rng(1).standard_normal(outs[0].shape)
  grads = jax.grad(lambda os, ls: jnp.sum(
      attnjax.merge_attentions(os, ls)[0] * g), argnums=(0, 1))(
          [jnp.asarray(np.nan_to_num(o)) for o in outs],
          [jnp.asarray(l) for l in lses])
  for gs in grads:
    for gi in gs:
      assert np.all(np.isfinite(np.asarray(gi)))
  w = np.exp(np.stack(lses).astype(np.float64) - np.where(
      np.isneginf(ref_lse), 0.0, ref_lse))
  w = np.where(np.isneginf(np.stack(lses)), 0.0, w)
  for p in range(3):
    np.testing.assert_allclose(np.asarray(grads[0][p]),
                               np.swapaxes(w[p], -1, -2)[..., None] * g,
                               atol=1e-6, rtol=1e-5)


def test_huge_magnitudes_are_stable_and_layouts_agree():
  outs, lses = _parts(2, scale=3e4)    # exp would overflow without the shift
  # Also under the strict JAX modes (explicit ranks and dtypes).
  with strict_mode("rank_promotion"), strict_mode("dtype_promotion"):
    out, lse = attnjax.merge_attentions(outs, lses)
  ref_out, ref_lse = _merge_np(outs, lses)
  np.testing.assert_allclose(np.asarray(out), ref_out, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(lse), ref_lse, rtol=1e-6)
  out_t, lse_t = attnjax.merge_attentions(
      outs, [np.swapaxes(l, 1, 2) for l in lses], lse_layout="BTN")
  np.testing.assert_array_equal(np.asarray(out_t), np.asarray(out))
  np.testing.assert_array_equal(np.asarray(lse_t),
                                np.swapaxes(np.asarray(lse), 1, 2))


def test_bf16_outs_keep_dtype():
  outs, lses = _parts(3)
  out, lse = attnjax.merge_attentions(
      [jnp.asarray(o, jnp.bfloat16) for o in outs], lses)
  assert out.dtype == jnp.bfloat16 and lse.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out, np.float32),
                             _merge_np(outs, lses)[0], atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("args,kw,needle", [
    (([], []), {}, "outs"),
    (([np.zeros((1, 2, 3, 4))], []), {}, "outs"),
    (([np.zeros((1, 2, 3, 4)), np.zeros((1, 2, 3, 5))],
      [np.zeros((1, 3, 2))] * 2), {}, "outs"),
    (([np.zeros((1, 2, 3, 4))], [np.zeros((1, 2, 3))]), {}, "lses[0]"),
    (([np.zeros((1, 2, 3, 4))], [np.zeros((1, 3, 2))]),
     dict(lse_layout="TNB"), "lse_layout"),
])
def test_bad_arguments_raise_value_error(args, kw, needle):
  with pytest.raises(ValueError) as e:
    attnjax.merge_attentions(*args, **kw)
  assert needle in str(e.value)
