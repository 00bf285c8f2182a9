"""attnjax._dispatch: the one implementation= semantics every op shares."""

import dataclasses
from typing import ClassVar, Optional

import pytest

from attnjax import _dispatch
from attnjax._dispatch import BackendConfig, Op


@dataclasses.dataclass(frozen=True)
class Fast(BackendConfig):
  backend: ClassVar[str] = "fast"
  block: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class Other(BackendConfig):
  backend: ClassVar[str] = "other"


@pytest.fixture
def op():
  o = Op("_test_op", auto_order=lambda x: ["fast", "ref"] if x > 0 else
         ["ref"])
  o.register("ref", lambda cfg, x: ("ref", x, cfg))

  def fast(cfg, x):
    if x > 10:
      raise NotImplementedError("x > 10")
    return ("fast", x, cfg)

  o.register("fast", fast, config_type=Fast)
  yield o
  del _dispatch._OPS["_test_op"]


def test_auto_order_and_fallback(op):
  assert op(None, 1)[0] == "fast"
  assert op("auto", 1)[0] == "fast"
  assert op(None, -1)[0] == "ref"
  assert op(None, 11)[0] == "ref"          # fast refuses, auto falls back


def test_name_config_and_sequence(op):
  assert op("ref", 1) == ("ref", 1, None)
  cfg = Fast(block=8)
  assert op(cfg, 1) == ("fast", 1, cfg)
  assert op([cfg, "ref"], 11) == ("ref", 11, None)
  assert op(("fast", None), 11)[0] == "ref"


def test_explicit_refusal_is_reraised(op):
  with pytest.raises(NotImplementedError, match="x > 10"):
    op("fast", 11)


def test_all_refusals_reported_together(op):
  op.register("picky", lambda cfg, x: (_ for _ in ()).throw(
      NotImplementedError("never")))
  with pytest.raises(NotImplementedError) as e:
    op(["fast", "picky"], 11)
  assert "x > 10" in str(e.value) and "never" in str(e.value)


def test_bad_implementation_values(op):
  with pytest.raises(ValueError, match="implementation"):
    op("nope", 1)
  with pytest.raises(ValueError, match="does not have"):
    op(Other(), 1)
  with pytest.raises(ValueError, match="empty"):
    op([], 1)
  with pytest.raises(ValueError, match="implementation"):
    op(3.5, 1)


def test_register_refuses_overwrite(op):
  with pytest.raises(ValueError, match="already registered"):
    op.register("ref", lambda cfg, x: x)
  op.register("ref", lambda cfg, x: ("new", x), overwrite=True)
  assert op("ref", 1) == ("new", 1)
  with pytest.raises(ValueError, match="config_type"):
    op.register("weird", lambda cfg, x: x, config_type=Fast)
  with pytest.raises(ValueError, match="already registered"):
    Op("_test_op")


def test_lazy_backend_unavailable(op):
  op.register("kernel", lazy="attnjax_no_such_module_xyz")
  assert "kernel" in op.names()
  with pytest.raises(NotImplementedError, match="unavailable"):
    op("kernel", 1)
  assert op(["kernel", "ref"], 1)[0] == "ref"


# ---------------------------------------------------------------------------
# The softmax op on this dispatch: config objects reach their backend,
# sequences fall back, register_backend refuses a silent overwrite.
# ---------------------------------------------------------------------------

import jax  # noqa: E402
import numpy as np  # noqa: E402

import attnjax  # noqa: E402
from attnjax import softmax as sm  # noqa: E402


def _qkv(t=32, n=2, h=8):
  ks = jax.random.split(jax.random.key(0), 3)
  return tuple(jax.random.normal(k, (1, t, n, h)) for k in ks)


def _eqn_params(jaxpr, prim):
  """params of every `prim` equation, searching nested jaxprs."""
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == prim:
      out.append(eqn.params)
    for v in eqn.params.values():
      for sub in (v if isinstance(v, (tuple, list)) else (v,)):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          out += _eqn_params(inner, prim)
  return out


def test_chunked_config_block_sizes_reach_the_backend():
  """Chunked(block_q) sets the number of query blocks: the forward's
  lax.map over query blocks is a scan of length T / block_q."""
  q, k, v = _qkv(t=32)
  for bq, want in ((8, 4), (16, 2)):
    jaxpr = jax.make_jaxpr(lambda q, k, v: attnjax.dot_product_attention(
        q, k, v, implementation=sm.Chunked(block_q=bq, block_kv=8)))(q, k, v)
    lengths = {p["length"] for p in _eqn_params(jaxpr.jaxpr, "scan")}
    assert want in lengths and (4 if bq == 16 else 2) not in lengths, (
        bq, lengths)
  ref = attnjax.dot_product_attention(q, k, v, implementation="xla")
  out = attnjax.dot_product_attention(
      q, k, v, implementation=sm.Chunked(block_q=8, block_kv=8))
  np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)
  # The alias is the same call.
  alias = sm.chunked_dot_product_attention(q, k, v, block_q=8, block_kv=8)
  np.testing.assert_array_equal(alias, out)


def test_pallas_config_reaches_the_kernel():
  """Pallas(block_q) sets the kernel's grid (T / block_q query tiles) and
  Pallas(interpret=True) runs it on CPU."""
  q, k, v = _qkv(t=32)
  grids = {}
  for bq in (8, 16):
    cfg = sm.Pallas(block_q=bq, block_kv=16, interpret=True)
    jaxpr = jax.make_jaxpr(lambda q, k, v: attnjax.dot_product_attention(
        q, k, v, implementation=cfg))(q, k, v)
    (params,) = _eqn_params(jaxpr.jaxpr, "pallas_call")
    grids[bq] = tuple(params["grid_mapping"].grid)
  assert grids[8][-1] == 4 and grids[16][-1] == 2, grids
  out = attnjax.dot_product_attention(
      q, k, v, implementation=sm.Pallas(block_q=8, block_kv=8,
                                        interpret=True))
  ref = attnjax.dot_product_attention(q, k, v, implementation="xla")
  np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)


def test_softmax_sequence_falls_back_and_collects_refusals():
  q, k, v = _qkv(t=16)
  ref = attnjax.dot_product_attention(q, k, v, implementation="xla")
  if jax.default_backend() != "gpu":
    # cuDNN and the compiled Triton kernels need a GPU: both refuse, 'xla'
    # serves.
    out = attnjax.dot_product_attention(
        q, k, v, implementation=[sm.Cudnn(), "triton", sm.Xla()])
    np.testing.assert_array_equal(out, ref)
    with pytest.raises(NotImplementedError) as e:
      attnjax.dot_product_attention(q, k, v, implementation=["cudnn",
                                                             "triton"])
    assert "cudnn" in str(e.value) and "triton" in str(e.value)
  # A refusal by option (dropout) falls through the same way on every
  # platform: the Pallas kernel has no dropout, 'xla' has.
  kw = dict(dropout_rate=0.5, dropout_rng=jax.random.key(1))
  out = attnjax.dot_product_attention(
      q, k, v, implementation=[sm.Pallas(interpret=True), "xla"], **kw)
  np.testing.assert_array_equal(
      out, attnjax.dot_product_attention(q, k, v, implementation="xla",
                                         **kw))
  with pytest.raises(NotImplementedError, match="dropout"):
    attnjax.dot_product_attention(q, k, v, implementation="pallas", **kw)


def test_softmax_bad_implementation_values():
  q, k, v = _qkv(t=8)
  with pytest.raises(ValueError, match="implementation"):
    attnjax.dot_product_attention(q, k, v, implementation="nope")
  with pytest.raises(ValueError, match="implementation"):
    attnjax.dot_product_attention(q, k, v, implementation=Fast())
  # Unknown names are refused before anything runs, even for empty inputs.
  with pytest.raises(ValueError, match="implementation"):
    attnjax.dot_product_attention(q[:, :0], k, v, implementation="nope")


def test_register_backend_refuses_silent_overwrite():
  with pytest.raises(ValueError, match="already registered"):
    attnjax.register_backend("xla", lambda call, need_lse: (None, None))
  calls = []

  def spy(call, need_lse):
    calls.append(need_lse)
    return sm.xla_attention(call, need_lse)

  attnjax.register_backend("_spy", spy)
  try:
    with pytest.raises(ValueError, match="already registered"):
      attnjax.register_backend("_spy", spy)
    attnjax.register_backend("_spy", spy, overwrite=True)
    assert "_spy" in attnjax.available_implementations()
    q, k, v = _qkv(t=8)
    out, lse = attnjax.dot_product_attention_with_lse(
        q, k, v, implementation="_spy")
    assert calls == [True]
    np.testing.assert_array_equal(
        out, attnjax.dot_product_attention(q, k, v, implementation="xla"))
    # A registered fn(call, need_lse) that returns no lse refuses lse calls.
    attnjax.register_backend("_spy", lambda call, need_lse: (
        sm.xla_attention(call, False)[0], None), overwrite=True)
    with pytest.raises(NotImplementedError, match="log-sum-exp"):
      attnjax.dot_product_attention_with_lse(q, k, v, implementation="_spy")
  finally:
    sm.OP.unregister("_spy")
  assert "_spy" not in attnjax.available_implementations()


# ---------------------------------------------------------------------------
# The family ops share the semantics: None/'auto' is auto ('xla' here), a
# kernel's refusal falls through a sequence, a config of another op is a
# ValueError naming `implementation`.
# ---------------------------------------------------------------------------

def test_family_ops_share_the_semantics():
  from attnjax.sequence import linear as lin
  from attnjax.sequence import sparse
  ops = _dispatch.list_ops()
  for name in ("dot_product_attention", "linear_attention",
               "sliding_window_attention", "block_sparse_attention"):
    assert "xla" in ops[name], (name, ops)
  q, k, v = _qkv(t=16)
  ref = lin.linear_attention(q, k, v, implementation="xla")
  for impl in (None, "auto", lin.Xla(), ["xla"]):
    np.testing.assert_array_equal(
        lin.linear_attention(q, k, v, implementation=impl), ref)
  # The kernel is causal-only: refused alone, skipped in a sequence.
  with pytest.raises(NotImplementedError, match="causal kernel"):
    lin.linear_attention(q, k, v, implementation=lin.Pallas(interpret=True))
  np.testing.assert_array_equal(lin.linear_attention(
      q, k, v, implementation=[lin.Pallas(interpret=True), "xla"]), ref)
  with pytest.raises(ValueError, match="implementation"):
    lin.linear_attention(q, k, v, implementation=sm.Chunked())
  with pytest.raises(ValueError, match="implementation"):
    lin.linear_attention(q, k, v, implementation="chunked")
  band = sparse.sliding_window_attention(q, k, v, 3, implementation="xla")
  np.testing.assert_array_equal(
      sparse.sliding_window_attention(q, k, v, 3), band)
  np.testing.assert_allclose(
      band, sparse.sliding_window_attention_reference(q, k, v, 3),
      rtol=2e-5, atol=2e-5)
  layout = np.tril(np.ones((2, 2), bool))
  blocks = sparse.block_sparse_attention(q, k, v, layout, 8,
                                         implementation="auto")
  np.testing.assert_allclose(
      blocks, sparse.block_sparse_attention_reference(q, k, v, layout, 8),
      rtol=2e-5, atol=2e-5)
  with pytest.raises(ValueError, match="implementation"):
    sparse.block_sparse_attention(q, k, v, layout, 8, implementation="nope")
