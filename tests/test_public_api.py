"""The public names of ../shared/DESIGN.md's contract exist with their signatures."""

import inspect

import attnjax
import pallas_kernels


def _params(fn):
  return inspect.signature(fn).parameters


def test_contract_names_and_keywords():
  p = _params(attnjax.dot_product_attention)
  for name in ("query", "key", "value", "bias", "mask", "scale", "is_causal",
               "local_window_size", "implementation"):
    assert name in p, name
  p = _params(attnjax.neighborhood_attention)
  for name in ("query", "key", "value", "kernel_size", "dilation", "is_causal",
               "scale"):
    assert name in p, name
  p = _params(attnjax.linear_attention)
  for name in ("query", "key", "value", "feature_map", "is_causal"):
    assert name in p, name
  assert p["feature_map"].default == "elu_plus_one"
  p = _params(pallas_kernels.flash_attention)
  for name in ("query", "key", "value", "is_causal", "scale", "interpret"):
    assert name in p, name
  assert p["interpret"].default is None


def test_all_exports_resolve():
  for mod in (attnjax, attnjax.sequence, attnjax.spatial, attnjax.distributed,
              pallas_kernels):
    for name in mod.__all__:
      assert hasattr(mod, name), f"{mod.__name__}.{name}"
