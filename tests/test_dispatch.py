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
