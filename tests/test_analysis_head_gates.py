"""Head gates on attnjax layers: head importance (Michel et al. 2019) against
a closed form and finite differences, and head pruning against zeroed
output-projection rows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import analysis as an
from attnjax.nn import MultiHeadAttention
from attnjax.softmax import attention_weights


class TwoLayer(nnx.Module):
  def __init__(self, rngs):
    self.a = MultiHeadAttention(3, 8, head_dim=4, rngs=rngs)
    self.b = MultiHeadAttention(3, 8, head_dim=4, rngs=rngs)

  def __call__(self, x):
    return self.b(x + self.a(x))


X = jax.random.normal(jax.random.key(1), (2, 5, 8))
C = jax.random.normal(jax.random.key(2), (2, 5, 8))


def _per_head_out(layer, x):
  """Reference: head h's contribution o_h W_O,h [N, B, T, F] (plain jnp)."""
  q, k, v = layer.project_qkv(x)
  w = attention_weights(q, k)                          # [B, N, T, S]
  o = jnp.einsum("bnts,bsnh->bnth", w, v)
  return jnp.einsum("bnth,nho->nbto", o, layer.out.kernel[...])


def test_gate_is_identity_at_one_and_zero_gate_drops_head():
  m = MultiHeadAttention(3, 8, head_dim=4, rngs=nnx.Rngs(0))
  view, paths = an.gated_view(m)
  assert paths == [""] and m.head_gate is None          # model untouched
  np.testing.assert_allclose(view(X), m(X), atol=1e-6)
  pruned = an.prune_heads(m, [jnp.array([1.0, 0.0, 1.0])])
  ref = _per_head_out(m, X)
  want = ref[0] + ref[2] + m.out.bias[...]
  np.testing.assert_allclose(pruned(X), want, atol=1e-5)
  with jax.numpy_rank_promotion("raise"):   # the gate broadcasts explicitly
    np.testing.assert_allclose(pruned(X), want, atol=1e-5)
  with pytest.raises(ValueError, match="head_gate.*num_heads"):
    nnx.with_attributes(m, head_gate=jnp.ones(2))(X)
  with pytest.raises(ValueError, match="mask.*shape"):
    an.prune_heads(m, [jnp.ones(4)])


def test_importance_closed_form_and_zero_head():
  m = MultiHeadAttention(3, 8, head_dim=4, rngs=nnx.Rngs(0))
  m.out.kernel[...] = m.out.kernel[...].at[1].set(0.0)   # head 1 writes nothing
  loss = lambda model, batch: jnp.sum(model(batch[0]) * batch[1])
  imp = an.head_importance(m, loss, [(X, C)], normalize=False)[""]
  # L = sum(c * (sum_h xi_h o_h W_O,h + b)) -> dL/dxi_h = sum(c * o_h W_O,h)
  want = np.abs(np.asarray(jnp.sum(_per_head_out(m, X) * C, (1, 2, 3))))
  np.testing.assert_allclose(imp, want, rtol=1e-4, atol=1e-6)
  assert imp[1] == 0.0 and imp[0] > 0 and imp[2] > 0
  # mean over batches of per-batch |grad|; layer-normalized by L2
  two = an.head_importance(m, loss, [(X, C), (X, -2 * C)], normalize=False)[""]
  np.testing.assert_allclose(two, 1.5 * want, rtol=1e-4, atol=1e-6)
  normed = an.head_importance(m, loss, [(X, C)])[""]
  np.testing.assert_allclose(normed, want / np.linalg.norm(want), rtol=1e-4)


def test_importance_finite_difference_two_layers():
  m = TwoLayer(nnx.Rngs(3))
  loss = lambda model, x: jnp.mean(model(x) ** 2)
  imp = an.head_importance(m, loss, [X], normalize=False, jit=False)
  assert list(imp) == ["a", "b"]
  view, _ = an.gated_view(m)
  gd, gates, rest = nnx.split(view, an.HeadGate, ...)
  leaves, tree = jax.tree.flatten(gates)                # layers a, b
  f = jax.jit(lambda ls: loss(nnx.merge(gd, jax.tree.unflatten(tree, ls),
                                        rest), X))
  eps = 1e-2
  for li, path in enumerate(["a", "b"]):
    for h in range(3):
      def at(delta):
        ls = list(leaves)
        ls[li] = ls[li].at[h].add(delta)
        return float(f(ls))
      fd = abs(at(eps) - at(-eps)) / (2 * eps)
      np.testing.assert_allclose(imp[path][h], fd, rtol=2e-2, atol=1e-5)


def test_pruning_curve_order_and_ends():
  m = TwoLayer(nnx.Rngs(3))
  imp = {"a": np.array([0.3, 0.1, 0.5]), "b": np.array([0.2, 0.9, 0.05])}
  seen = []

  def eval_fn(view):
    layers = an.gated_layers(view)
    seen.append(np.concatenate([np.asarray(l.head_gate[...]) for _, l in layers]))
    return float(jnp.sum(view(X)))

  curve = an.pruning_curve(m, imp, eval_fn, counts=[0, 2, 6])
  assert [k for k, _ in curve] == [0, 2, 6]
  # increasing importance: b2 (0.05), a1 (0.1) go first
  np.testing.assert_array_equal(seen[1], [1, 0, 1, 1, 1, 0])
  assert curve[0][1] == pytest.approx(float(jnp.sum(m(X))), rel=1e-5)
  # everything pruned: each layer returns its output bias only
  bb = np.asarray(m.b.out.bias[...])
  assert curve[2][1] == pytest.approx(X.shape[0] * X.shape[1] * bb.sum(),
                                      abs=1e-4)
  with pytest.raises(ValueError, match="counts"):
    an.pruning_curve(m, imp, eval_fn, counts=[7])
