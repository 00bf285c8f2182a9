"""Parameter and FLOP counts of vision models without allocating them.

* Parameters: `nnx.eval_shape` builds the model abstractly; we sum the sizes
  of its `nnx.Param`s (BatchNorm running statistics are not parameters).
* FLOPs: counted analytically from the model's traced jaxpr (`jax.make_jaxpr`
  on abstract parameters, so nothing is compiled or allocated): every
  `dot_general` contributes prod(output shape) x prod(contracted dims) and
  every `conv_general_dilated` prod(output shape) x (C_in / groups) x
  prod(kernel window) multiply-adds; sub-jaxprs (jit, custom_vjp, remat,
  cond) are walked and `scan`/`while` bodies multiplied by their trip count.
  Convention: ONE multiply-add = ONE FLOP, and only matmuls/convolutions
  count (softmax, norms, activations are ignored) -- the convention of
  fvcore / the papers' "FLOPs" columns (which are really MACs).
* Sparse primitives whose implementation computes more than the mechanism
  defines (the tiled neighborhood attention multiplies each query tile with
  the union of its tile's windows) are counted by definition instead:
  `ANALYTIC_RULES` wraps them during tracing in a named scope, their
  matmuls are skipped and the rule's count (NA: every query times its
  prod(kernel) keys, for q.k and p.v) is added. Window/grid attention count
  as implemented (padded windows, as the papers do).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.extend.core import ClosedJaxpr, Jaxpr


def count_params(model_or_ctor) -> int:
  """Number of trainable parameters. Accepts a model or a zero-arg ctor
  (then built with `nnx.eval_shape`, allocating nothing)."""
  model = model_or_ctor
  if callable(model_or_ctor) and not isinstance(model_or_ctor, nnx.Module):
    model = nnx.eval_shape(model_or_ctor)
  leaves = jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))
  return int(sum(int(np.prod(x.shape)) for x in leaves))


def _na_rule(query, key, value, kernel_size, **kw):
  nd = query.ndim - 3
  ks = (kernel_size,) * nd if isinstance(kernel_size, int) else tuple(kernel_size)
  return (int(np.prod(query.shape[:-1])) * int(np.prod(ks))
          * (query.shape[-1] + value.shape[-1]))


def _analytic_rules():
  from attnjax.spatial import neighborhood
  return [(neighborhood, "neighborhood_attention", _na_rule)]


_SCOPE = "analytic_count__"


@contextlib.contextmanager
def _analytic_patches(tally):
  patched = []
  try:
    for mod, name, rule in _analytic_rules():
      orig = getattr(mod, name)

      def wrapper(*args, _orig=orig, _rule=rule, **kwargs):
        tally.append(_rule(*args, **kwargs))
        with jax.named_scope(_SCOPE):
          return _orig(*args, **kwargs)

      setattr(mod, name, wrapper)
      patched.append((mod, name, orig))
    yield
  finally:
    for mod, name, orig in patched:
      setattr(mod, name, orig)


def _sub_jaxprs(eqn):
  for v in eqn.params.values():
    vals = v if isinstance(v, (list, tuple)) else [v]
    for x in vals:
      if isinstance(x, ClosedJaxpr):
        yield x.jaxpr
      elif isinstance(x, Jaxpr):
        yield x


def jaxpr_macs(jaxpr) -> Tuple[int, Dict[str, int]]:
  """Multiply-adds of matmuls/convolutions in a (closed) jaxpr."""
  if isinstance(jaxpr, ClosedJaxpr):
    jaxpr = jaxpr.jaxpr
  total = 0
  by = {"dot_general": 0, "conv": 0}
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name in ("dot_general", "conv_general_dilated") and _SCOPE in str(
        eqn.source_info.name_stack):
      continue
    if name == "dot_general":
      (lc, rc), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      out = eqn.outvars[0].aval.shape
      m = int(np.prod(out)) * int(np.prod([lhs[d] for d in lc]))
      total += m
      by["dot_general"] += m
    elif name == "conv_general_dilated":
      dn = eqn.params["dimension_numbers"]
      rhs = eqn.invars[1].aval.shape
      out = eqn.outvars[0].aval.shape
      rhs_spec = dn.rhs_spec    # (out_ch, in_ch, *spatial)
      k_in = rhs[rhs_spec[1]]
      k_sp = int(np.prod([rhs[d] for d in rhs_spec[2:]]))
      m = int(np.prod(out)) * k_in * k_sp
      total += m
      by["conv"] += m
    else:
      mult = 1
      if name == "scan":
        mult = int(eqn.params["length"])
      for sub in _sub_jaxprs(eqn):
        t, b = jaxpr_macs(sub)
        total += mult * t
        for k in by:
          by[k] += mult * b[k]
  return total, by


def count_flops(ctor: Callable[[], nnx.Module], image_size=224,
                in_chans: int = 3, batch: int = 1) -> int:
  """Multiply-adds of one forward pass of a `batch` of images (see module doc).

  `ctor` is a zero-argument model constructor; the model is built with
  `nnx.eval_shape` and traced with `jax.make_jaxpr` (no allocation/compile).
  """
  hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
  abstract = nnx.eval_shape(ctor)
  abstract.eval()
  graphdef, state = nnx.split(abstract)

  def fwd(state, x):
    return nnx.merge(graphdef, state)(x)

  x = jax.ShapeDtypeStruct((batch, *hw, in_chans), jnp.float32)
  tally = []
  with _analytic_patches(tally):
    jaxpr = jax.make_jaxpr(fwd)(state, x)
  return (jaxpr_macs(jaxpr)[0] + sum(tally)) // batch
