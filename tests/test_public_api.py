"""The public names of docs/design.md's contract exist with their signatures."""

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


def test_contract_aliases_and_registry():
  """design.md's other stable names: the chunked alias, register_backend
  with `overwrite`, available_implementations."""
  p = _params(attnjax.chunked_dot_product_attention)
  for name in ("block_q", "block_kv", "return_lse"):
    assert name in p, name
  p = _params(attnjax.register_backend)
  assert "overwrite" in p and p["overwrite"].default is False
  assert {"xla", "chunked", "pallas"} <= set(
      attnjax.available_implementations())


def test_design_notes_are_in_the_repository():
  """The contract these tests check is written in docs/design.md."""
  import pathlib
  root = pathlib.Path(__file__).resolve().parents[1]
  text = (root / "docs" / "design.md").read_text()
  for name in ("dot_product_attention", "neighborhood_attention",
               "linear_attention", "flash_attention",
               "chunked_dot_product_attention", "register_backend"):
    assert name in text, name


def test_all_exports_resolve():
  for mod in (attnjax, attnjax.sequence, attnjax.spatial, attnjax.distributed,
              pallas_kernels):
    for name in mod.__all__:
      assert hasattr(mod, name), f"{mod.__name__}.{name}"
