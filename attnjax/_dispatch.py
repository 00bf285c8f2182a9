"""One dispatch for every attention op: `implementation=` means the same everywhere.

Every public primitive that has more than one way to run (and every new one,
even with a single backend) is an `Op`. Its `implementation=` argument accepts

  * None or "auto": the op's automatic order (a function of the call, e.g. the
    measured xla/chunked crossover for softmax), first backend that serves
    the call wins;
  * a backend name, e.g. "xla", "chunked", "pallas";
  * a backend config object: an instance of a frozen dataclass subclassing
    `BackendConfig` whose class attribute `backend` names the backend and
    whose fields carry its tuning (block sizes, chunk sizes, interpret, ...);
  * a sequence of the above, tried in order.

A backend that cannot serve a call raises NotImplementedError saying why; the
op tries the next candidate and, when none serves, raises one
NotImplementedError listing every refusal. An unknown name is a ValueError
naming `implementation` and the accepted names, raised before anything runs.

Backends are plain functions `fn(config, *args, **kwargs)` where `config` is
the `BackendConfig` instance the user passed, or None (use defaults). Adding a
backend to an op is one file that calls `op.register(name, fn, ...)` at import
time; `lazy=` registers a module to import on first use (kernels that need
optional dependencies). `register` refuses to replace an existing backend
unless `overwrite=True`.

This module sits at the bottom of the import graph: it imports nothing from
attnjax or pallas_kernels.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import (Any, Callable, ClassVar, Dict, List, Optional, Sequence,
                    Tuple, Union)

__all__ = ["AUTO", "BackendConfig", "Op", "get_op", "list_ops"]

AUTO = "auto"


@dataclasses.dataclass(frozen=True)
class BackendConfig:
  """Base class of backend config objects.

  Subclass as a frozen dataclass and set the class attribute `backend` to the
  backend's name; the fields are that backend's tuning knobs, e.g.

      @dataclasses.dataclass(frozen=True)
      class Chunked(BackendConfig):
        backend: ClassVar[str] = "chunked"
        block_q: Optional[int] = None
        block_kv: Optional[int] = None
  """
  backend: ClassVar[str] = ""


Implementation = Union[None, str, BackendConfig,
                       Sequence[Union[str, BackendConfig]]]

_OPS: Dict[str, "Op"] = {}


class Op:
  """A named operation with registered backends and an automatic order."""

  def __init__(self, name: str, *,
               auto_order: Optional[Callable[..., Sequence[str]]] = None):
    """`auto_order(*args, **kwargs) -> names` gives the automatic order for a
    call (it receives the same arguments as the backends, without config);
    default: the registration order."""
    if name in _OPS:
      raise ValueError(f"an op named {name!r} is already registered.")
    self.name = name
    self._backends: Dict[str, Callable] = {}
    self._lazy: Dict[str, str] = {}
    self._configs: Dict[str, type] = {}
    self._auto_order = auto_order
    _OPS[name] = self

  # -- registration -------------------------------------------------------
  def register(self, name: str, fn: Optional[Callable] = None, *,
               config_type: Optional[type] = None,
               lazy: Optional[str] = None, overwrite: bool = False):
    """Registers backend `name`: `fn(config, *args, **kwargs)`.

    `config_type`: the BackendConfig subclass this backend accepts (its
    `backend` attribute must equal `name`). `lazy`: a module path imported on
    first use instead of `fn` (importing it must call `register(name, fn,
    overwrite=True)`). Registering an existing name raises ValueError unless
    `overwrite=True`. Usable as a decorator when `fn` is omitted.
    """
    if fn is None and lazy is None:
      return lambda f: self.register(name, f, config_type=config_type,
                                     overwrite=overwrite) or f
    if not isinstance(name, str) or not name or name == AUTO:
      raise ValueError(f"backend name must be a non-empty string other than "
                       f"{AUTO!r}, got {name!r}.")
    exists = name in self._backends or name in self._lazy
    if exists and not overwrite:
      raise ValueError(
          f"{self.name}: a backend named {name!r} is already registered; pass "
          f"overwrite=True to replace it.")
    if config_type is not None:
      if getattr(config_type, "backend", None) != name:
        raise ValueError(
            f"config_type {config_type.__name__}.backend must be {name!r}, got "
            f"{getattr(config_type, 'backend', None)!r}.")
      self._configs[name] = config_type
    if lazy is not None:
      self._lazy[name] = lazy
    else:
      self._backends[name] = fn
      self._lazy.pop(name, None)
    return None

  def unregister(self, name: str) -> None:
    """Removes a backend (tests and user plug-ins)."""
    self._backends.pop(name, None)
    self._lazy.pop(name, None)
    self._configs.pop(name, None)

  def names(self) -> List[str]:
    """Backend names accepted by `implementation=` (some may refuse a call)."""
    return sorted(set(self._backends) | set(self._lazy))

  def backend(self, name: str) -> Callable:
    """The backend function (imports a lazy backend; NotImplementedError if
    its module cannot be imported here)."""
    if name not in self._backends and name in self._lazy:
      try:
        importlib.import_module(self._lazy[name])
      except ImportError as e:
        raise NotImplementedError(
            f"{self.name}(implementation={name!r}) is unavailable here: "
            f"{e}") from e
    if name not in self._backends:
      raise ValueError(
          f"`implementation` of {self.name} must be one of {self.names()}, "
          f"{AUTO!r}, None, a BackendConfig, or a sequence of these; got "
          f"{name!r}.")
    return self._backends[name]

  # -- resolution ---------------------------------------------------------
  def resolve(self, implementation: Implementation
              ) -> List[Tuple[Optional[str], Optional[BackendConfig]]]:
    """Candidates [(name or None for auto, config)] in order; validates."""
    if implementation is None or isinstance(implementation,
                                            (str, BackendConfig)):
      items = [implementation]
    else:
      try:
        items = list(implementation)
      except TypeError:
        items = [implementation]
      if not items:
        raise ValueError(
            f"`implementation` of {self.name} is an empty sequence.")
    out = []
    for item in items:
      if item is None or item == AUTO:
        out.append((None, None))
      elif isinstance(item, str):
        if item not in self._backends and item not in self._lazy:
          self.backend(item)          # raises the ValueError
        out.append((item, None))
      elif isinstance(item, BackendConfig):
        name = type(item).backend
        if name not in self._backends and name not in self._lazy:
          raise ValueError(
              f"`implementation` of {self.name}: {type(item).__name__} is for "
              f"backend {name!r}, which {self.name} does not have (it has "
              f"{self.names()}).")
        want = self._configs.get(name)
        if want is not None and not isinstance(item, want):
          raise ValueError(
              f"`implementation` of {self.name}: backend {name!r} takes a "
              f"{want.__name__}, got {type(item).__name__}.")
        out.append((name, item))
      else:
        raise ValueError(
            f"`implementation` of {self.name} must be a name in "
            f"{self.names()}, {AUTO!r}, None, a BackendConfig, or a sequence "
            f"of these; got {item!r}.")
    return out

  def auto_order(self, *args, **kwargs) -> List[str]:
    if self._auto_order is None:
      return list(self._backends) + [n for n in self._lazy
                                     if n not in self._backends]
    return list(self._auto_order(*args, **kwargs))

  def __call__(self, implementation: Implementation, *args, **kwargs):
    """Runs the first candidate backend that serves the call."""
    candidates = self.resolve(implementation)
    explicit_single = (len(candidates) == 1 and candidates[0][0] is not None)
    refusals = []
    for name, config in candidates:
      names = [name] if name is not None else self.auto_order(*args, **kwargs)
      for n in names:
        try:
          fn = self.backend(n)
          return fn(config if name is not None else None, *args, **kwargs)
        except NotImplementedError as e:
          if explicit_single:
            raise
          refusals.append(f"{n}: {e}")
    raise NotImplementedError(
        f"no backend of {self.name} can serve this call: " +
        "; ".join(refusals))


def get_op(name: str) -> Op:
  """The registered op `name` (ValueError listing the ops otherwise)."""
  if name not in _OPS:
    raise ValueError(f"no op named {name!r}; ops: {sorted(_OPS)}.")
  return _OPS[name]


def list_ops() -> Dict[str, List[str]]:
  """{op name: backend names} for every registered op."""
  return {name: op.names() for name, op in sorted(_OPS.items())}
