"""Pretrained weights from local PyTorch checkpoints (no torch needed).

>>> from attnjax.models import vision
>>> model = vision.create_model("swin", "t")
>>> vision.load_timm(model, "swin_tiny_patch4_window7_224.safetensors")

`load_timm(model, path_or_state_dict)` reads a timm checkpoint (a
`.safetensors` file, read with the `safetensors` NumPy API, or an already
loaded `{name: np.ndarray}` dict), maps timm's parameter names and layouts to
the attnjax model (Linear [out, in] -> kernel [in, out]; conv [O, I, kh, kw]
-> HWIO; fused qkv kept fused where the attnjax layer is fused and split per
head for `attnjax.MultiHeadAttention`; LayerNorm/BatchNorm weight -> scale,
running stats -> batch stats; relative-position tables kept in Swin's
flattened layout) and writes every array into the model in place.

Nothing is downloaded: the user passes a file. Before anything is written,
every attnjax parameter must be matched by exactly one checkpoint tensor of
the right shape, and every checkpoint tensor must be used (derived buffers
such as `relative_position_index`, `attn_mask` and BatchNorm's
`num_batches_tracked` excepted); otherwise `CheckpointMismatchError` (a
ValueError) lists the missing keys, unexpected keys and shape mismatches.
`skip=("head",)` leaves the named attnjax sub-trees at their initial values
and drops the checkpoint tensors that would have filled them (fine-tuning
with a new number of classes).

Supported timm families (model name -> timm architecture): vit
(`vision_transformer`, e.g. vit_small_patch16_224 / deit_small_patch16_224),
agent-free DeiT-style ViTs only; swin (`swin_transformer`); davit; twins_svt
(`twins_svt_*`); convit; shvit; crossvit; maxvit (`maxvit_*_tf_*`).
"""

from __future__ import annotations

import os
import re
from typing import Callable, Dict, Iterable, Mapping, Optional, Sequence

import numpy as np
from flax import nnx

__all__ = ["CheckpointMismatchError", "load_state_dict", "load_timm",
           "timm_state_to_flat"]

# Derived buffers timm stores but attnjax recomputes.
_IGNORED = re.compile(
    r"(num_batches_tracked|relative_position_index|attn_mask|"
    r"\.rel_indices|relative_coords_table)$")


_WEIGHTS = (nnx.Param, nnx.BatchStat)   # what a checkpoint fills


class CheckpointMismatchError(ValueError):
  """The checkpoint does not fit the model; the message lists every
  missing key, unexpected key and shape mismatch."""


def load_state_dict(path_or_dict) -> Dict[str, np.ndarray]:
  """`{name: np.ndarray}` from a .safetensors file (or a dict, returned)."""
  if isinstance(path_or_dict, Mapping):
    return {k: np.asarray(v) for k, v in path_or_dict.items()}
  path = os.fspath(path_or_dict)
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint {path!r} does not exist.")
  if path.endswith(".npz"):
    with np.load(path) as f:
      return {k: f[k] for k in f.files}
  try:
    from safetensors.numpy import load_file
  except ImportError as e:     # pragma: no cover - depends on the install
    raise ImportError(
        "reading .safetensors checkpoints needs the `safetensors` package "
        "(pip install 'attnjax[convert]').") from e
  return load_file(path)


class _Mapper:
  """Collects (attnjax path -> array) assignments from a checkpoint."""

  def __init__(self, sd: Dict[str, np.ndarray], model_shapes):
    self.sd = sd
    self.shapes = model_shapes          # {"a/b/c": shape}
    self.out: Dict[str, np.ndarray] = {}
    self.used = set()
    self.missing_src = []
    self.bad_shape = []

  # -- sources ---------------------------------------------------------------
  def has(self, key):
    return key in self.sd

  def take(self, key):
    if key not in self.sd:
      self.missing_src.append(key)
      return None
    self.used.add(key)
    return np.asarray(self.sd[key])

  # -- destinations ----------------------------------------------------------
  def put(self, dst, arr, src="", src_shape=None):
    if arr is None:
      return
    src_shape = tuple(arr.shape) if src_shape is None else tuple(src_shape)
    want = self.shapes.get(dst)
    if want is None:
      self.bad_shape.append(f"{src or '?'} -> {dst}: no such attnjax "
                            "parameter")
      return
    if tuple(arr.shape) != tuple(want):
      self.bad_shape.append(f"{src} {src_shape} -> {dst} {tuple(want)}")
      return
    self.out[dst] = arr

  # -- layer helpers ---------------------------------------------------------
  def raw(self, dst, src, fn=lambda a: a):
    a = self.take(src)
    if a is not None:
      self.put(dst, fn(a), src, a.shape)

  def linear(self, dst, src, bias=True):
    self.raw(f"{dst}/kernel", f"{src}.weight", lambda w: w.T)
    if bias:
      self.raw(f"{dst}/bias", f"{src}.bias")

  def conv(self, dst, src, bias=True):
    self.raw(f"{dst}/kernel", f"{src}.weight", _hwio)
    if bias:
      self.raw(f"{dst}/bias", f"{src}.bias")

  def conv_as_linear(self, dst, src, bias=True):
    """1x1 conv weight [O, I, 1, 1] -> Linear kernel [I, O]."""
    self.raw(f"{dst}/kernel", f"{src}.weight", lambda w: w.reshape(
        w.shape[0], -1).T)
    if bias:
      self.raw(f"{dst}/bias", f"{src}.bias")

  def ln(self, dst, src):
    self.raw(f"{dst}/scale", f"{src}.weight")
    self.raw(f"{dst}/bias", f"{src}.bias")

  def bn(self, dst, src):
    self.ln(dst, src)
    self.raw(f"{dst}/mean", f"{src}.running_mean")
    self.raw(f"{dst}/var", f"{src}.running_var")

  def mlp(self, dst, src):
    self.linear(f"{dst}/fc1", f"{src}.fc1")
    self.linear(f"{dst}/fc2", f"{src}.fc2")

  def mha(self, dst, src, heads, *, qkv="qkv", proj="proj", bias=True):
    """Fused torch qkv Linear(d, 3d) -> attnjax.MultiHeadAttention
    query/key/value kernels [d, heads, hd] (+ biases [heads, hd]) and
    out [heads, hd, d]."""
    w = self.take(f"{src}.{qkv}.weight")
    b = self.take(f"{src}.{qkv}.bias") if bias else None
    if w is not None:
      d = w.shape[1]
      hd = w.shape[0] // (3 * heads)
      ws = w.reshape(3, heads, hd, d)
      for i, name in enumerate(("query", "key", "value")):
        self.put(f"{dst}/{name}/kernel", ws[i].transpose(2, 0, 1),
                 f"{src}.{qkv}.weight", w.shape)
        if b is not None:
          self.put(f"{dst}/{name}/bias", b.reshape(3, heads, hd)[i],
                   f"{src}.{qkv}.bias", b.shape)
    p = self.take(f"{src}.{proj}.weight")
    if p is not None:
      d = p.shape[0]
      self.put(f"{dst}/out/kernel", p.T.reshape(heads, -1, d),
               f"{src}.{proj}.weight", p.shape)
    self.raw(f"{dst}/out/bias", f"{src}.{proj}.bias")


def _hwio(w):
  return np.transpose(w, (2, 3, 1, 0))


def _model_shapes(model):
  shapes = {}
  for path, var in nnx.to_flat_state(nnx.state(model, _WEIGHTS)):
    shapes["/".join(map(str, path))] = tuple(var.get_value().shape)
  return shapes


def timm_state_to_flat(model, state_dict, *, skip: Sequence[str] = ()):
  """Maps a timm state dict onto `model`; returns {attnjax path: array}.

  Raises CheckpointMismatchError naming every missing / unexpected key and
  every shape mismatch.
  """
  from attnjax.models.vision import _timm_maps
  sd = load_state_dict(state_dict)
  shapes = _model_shapes(model)
  fn = _timm_maps.converter_for(model)
  m = _Mapper(sd, shapes)
  fn(m, model)
  skip = tuple(s.strip("/") for s in skip)

  def skipped(dst):
    return any(dst == s or dst.startswith(s + "/") for s in skip)

  # Drop checkpoint tensors whose destination is skipped.
  out = {k: v for k, v in m.out.items() if not skipped(k)}
  bad_shape = [b for b in m.bad_shape
               if not skipped(b.split(" -> ")[-1].split(" ")[0])]
  missing = sorted(k for k in shapes if k not in m.out and not skipped(k))
  unexpected = sorted(k for k in sd if k not in m.used
                      and not _IGNORED.search(k))
  absent = sorted(set(m.missing_src))
  if missing or unexpected or bad_shape or absent:
    def names(xs, sep=", ", cap=40):
      more = f"{sep}... and {len(xs) - cap} more" if len(xs) > cap else ""
      return sep.join(xs[:cap]) + more
    lines = [f"checkpoint does not fit {type(model).__name__}:"]
    if absent:
      lines.append(f"  missing keys (expected in the checkpoint, absent) "
                   f"[{len(absent)}]: " + names(absent))
    if unexpected:
      lines.append(f"  unexpected keys (in the checkpoint, unused) "
                   f"[{len(unexpected)}]: " + names(unexpected))
    if bad_shape:
      lines.append(f"  shape mismatches [{len(bad_shape)}]: "
                   + names(bad_shape, "; "))
    if missing:
      lines.append(f"  attnjax parameters left unset [{len(missing)}]: "
                   + names(missing))
    raise CheckpointMismatchError("\n".join(lines))
  return out


def _assign(model, flat):
  state = nnx.state(model, _WEIGHTS)
  for path, var in nnx.to_flat_state(state):
    key = "/".join(map(str, path))
    if key in flat:
      old = var.get_value()
      var.set_value(np.asarray(flat[key]).astype(old.dtype))
  nnx.update(model, state)


def load_timm(model, checkpoint, *, skip: Sequence[str] = ()):
  """Loads a timm checkpoint (path to .safetensors / .npz, or a dict of
  arrays) into `model` in place and returns `model`.

  `skip`: attnjax sub-tree paths (e.g. "head") left untouched; their
  checkpoint tensors are dropped. Raises CheckpointMismatchError when the
  checkpoint does not fit (nothing is written then).
  """
  flat = timm_state_to_flat(model, checkpoint, skip=skip)
  _assign(model, flat)
  return model
