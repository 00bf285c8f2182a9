"""Model registry: `create_model(name, preset, **overrides)`.

Each model has a `tiny` preset (32x32 inputs, CPU training/tests) and its
smallest official size (`PAPER_PRESET[name]`). `PAPER_STATS` holds the
parameter count and FLOPs (multiply-adds) at 224x224 reported by each
paper, with the table they come from (checked in tests/test_vision_counts.py).
"""

from __future__ import annotations

from typing import Any, Callable, Dict

from flax import nnx

_MODELS: Dict[str, Dict[str, Any]] = {}


def register(name: str, cls: Callable, presets: Dict[str, Dict[str, Any]]):
  _MODELS[name] = {"cls": cls, "presets": presets}


def model_names():
  return sorted(_MODELS)


def presets(name: str):
  _check(name)
  return sorted(_MODELS[name]["presets"])


def _check(name):
  if name not in _MODELS:
    raise ValueError(f"unknown model {name!r}; choose from {model_names()}.")


def model_kwargs(name: str, preset: str = "tiny", **overrides) -> Dict[str, Any]:
  _check(name)
  ps = _MODELS[name]["presets"]
  if preset not in ps:
    raise ValueError(
        f"unknown preset {preset!r} for {name!r}; choose from {sorted(ps)}.")
  kw = dict(ps[preset])
  kw.update(overrides)
  return kw


def create_model(name: str, preset: str = "tiny", *, rngs: nnx.Rngs = None,
                 seed: int = 0, **overrides):
  """Builds model `name` with preset `preset`; overrides replace preset keys
  (e.g. num_classes, in_chans, img_size)."""
  kw = model_kwargs(name, preset, **overrides)
  return _MODELS[name]["cls"](rngs=rngs if rngs is not None else nnx.Rngs(seed),
                              **kw)


def model_ctor(name: str, preset: str = "tiny", seed: int = 0, **overrides):
  """Zero-argument constructor (for nnx.eval_shape / count_flops)."""
  return lambda: create_model(name, preset, seed=seed, **overrides)
