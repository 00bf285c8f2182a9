r"""Resumable sweep of independent training runs ("cells").

Shared by experiments/benefits_of_rank.py and experiments/low_rank_bottleneck.py.
A study describes each training run as a `Cell` (model factory, loss, batch
sampler, evaluation, steps, Adam settings) and hands the list to
`train_cells`, which trains them in order inside one --workdir:

  cells/<cell>.json    result of a finished cell (skipped on re-runs)
  checkpoints/<cell>/  orbax checkpoints of the cell being trained (its whole
                       training state, params and Adam state, as one pytree)
  metrics.jsonl        training loss per chunk of steps; "step" is global
                       across cells, "cell" names the cell

Non-trainable model state (every nnx variable that is not an nnx.Param, e.g.
Performer's fixed random projection or the Routing Transformer's k-means
centroids) is an argument of the jitted training chunk, not a constant
closed over by it: XLA then neither embeds nor constant-folds it (cheaper
compiles). A cell with `train_attributes` (e.g. {"update_centroids":
True}) trains the model with those attributes set (nnx set_attributes), so
layers that update their own state in training do so; that state is carried
from step to step, checkpointed with the parameters, and the evaluation sees
its final value (with the model's attributes as constructed).

Per-step randomness: the batch of step s of a cell is
`batch_fn(fold_in(fold_in(key(cell.seed), 1), s))`, so a resumed cell
reproduces an uninterrupted one exactly.

Devices: `train_cells(..., mesh=, fsdp_axis=)` places the training state on
a `jax.sharding.Mesh` (experiments/sharding.py; replicated, or FSDP over
`fsdp_axis`) before the restore target is built, so orbax restores a
checkpoint written on any device count straight into this mesh; each
step's batch, sampled inside the jitted loop, is sharded over the mesh's
`data` axis (`sharding.constrain_batch`) and XLA all-reduces the gradients.
`make_mesh` checks the batch sizes against the `data` axis. The default
mesh "data:1" is the single-device run, bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import jax
import numpy as np
import optax
from flax import nnx

from experiments import common, sharding


Stopped = common.Stopped


def ints(s) -> List[int]:
  """'16,4,1' (or a list/tuple) -> [16, 4, 1]; '' -> []."""
  if isinstance(s, (list, tuple)):
    return [int(v) for v in s]
  s = str(s).strip()
  return [int(v) for v in s.split(",") if v.strip()] if s else []


def count_params(model) -> int:
  """Number of trainable (nnx.Param) scalars of `model`."""
  return int(sum(np.size(x) for x in
                 jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))))


make_mesh = sharding.make_training_mesh


@dataclasses.dataclass
class Cell:
  """One training run of a sweep.

  make_model() -> nnx.Module; loss_fn(model, batch) -> scalar;
  batch_fn(key) -> batch (key = fold_in(data_key, step));
  eval_fn(model) -> dict of scalars (deterministic). Adam with cosine decay
  from `lr` (after `warmup` linear warm-up steps). `info` is copied into
  the cell's result. `train_attributes`: attributes set on the model for
  training (e.g. {"update_centroids": True}: the Routing Transformer's
  online k-means step); with any, the non-trainable state the model
  updates in its training call is carried between steps, checkpointed,
  and used for evaluation (where the attributes are as constructed).
  """
  name: str
  make_model: Callable[[], nnx.Module]
  loss_fn: Callable[[nnx.Module, Any], jax.Array]
  batch_fn: Callable[[jax.Array], Any]
  eval_fn: Callable[[nnx.Module], Dict[str, Any]]
  steps: int
  lr: float
  seed: int
  b2: float = 0.999
  warmup: int = 0
  info: Dict[str, Any] = dataclasses.field(default_factory=dict)
  train_attributes: Dict[str, Any] = dataclasses.field(default_factory=dict)


def _final_loss(metrics, cell: str, step: int) -> float:
  """The loss logged for `cell` at its final step (metrics.jsonl)."""
  for rec in reversed(metrics.read()):
    if rec.get("cell") == cell and rec.get("cell_step") == step:
      return float(rec["loss"])
  raise RuntimeError(
      f"cell {cell}: its final checkpoint (step {step}) exists but "
      f"{metrics.path} has no loss for that step; delete "
      f"checkpoints/{cell} to retrain the cell.")


def _cell_file(workdir: str, name: str) -> str:
  return os.path.join(workdir, "cells", name + ".json")


@dataclasses.dataclass
class BuiltCell:
  """What `build_cell` returns: the model split for training, the initial
  training state on the mesh, and the jitted chunk of `chunk` Adam steps."""
  graphdef: Any             # the model as constructed (for evaluation)
  rest: Any                 # initial non-trainable model state, replicated
  init: Dict[str, Any]      # {"params": pure dict, "opt": Adam state}
  run_chunk: Callable       # jit(params, opt, start, rest)
                            #   -> params, opt, rest, loss
  carries_rest: bool        # training updates `rest` (train_attributes)


def build_cell(c: Cell, *, chunk: int, mesh: jax.sharding.Mesh,
               fsdp_axis: Optional[str] = None) -> BuiltCell:
  """Model, optimizer and jitted training chunk of one cell on `mesh`.

  `run_chunk(p, o, start, rest)` runs steps start .. start + chunk - 1
  (batch of step s from fold_in(data_key, s), sharded over the mesh's
  `data` axis) and returns the new state and the mean loss. `rest`, the
  non-trainable state, is an argument (not a compile-time constant);
  omitted (None), the initial one is closed over as a constant. It comes
  back updated where the cell has `train_attributes`, unchanged otherwise.
  """
  model = c.make_model()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  train_def, carries = graphdef, bool(c.train_attributes)
  if carries:
    model.set_attributes(**c.train_attributes)
    train_def = nnx.split(model, nnx.Param, ...)[0]
  # Pure dicts (as the params): a merged model's state variables are then
  # created inside the training trace, so its own updates may mutate them.
  rest = sharding.replicate(rest.to_pure_dict(), mesh)  # non-trainable state
  params = params.to_pure_dict()
  sched = (optax.warmup_cosine_decay_schedule(0.0, c.lr, c.warmup, c.steps)
           if c.warmup else optax.cosine_decay_schedule(c.lr, c.steps))
  tx = optax.adam(sched, b2=c.b2)
  # On the mesh before building the restore target: orbax then reads the
  # checkpoint straight into this mesh, whatever device count wrote it.
  init = sharding.shard_tree({"params": params, "opt": tx.init(params)},
                             mesh, fsdp_axis=fsdp_axis or None)
  data_key = jax.random.fold_in(jax.random.key(c.seed), 1)

  def loss_of(p, r, batch):
    m = nnx.merge(train_def, p, r)
    loss = c.loss_fn(m, batch)
    # The state the model left after its training call (e.g. centroids
    # moved by one k-means step), or the unchanged one.
    return loss, (nnx.split(m, nnx.Param, ...)[2].to_pure_dict() if carries
                  else r)

  @jax.jit
  def run_chunk(p, o, start, r=None):
    r = rest if r is None else r

    def body(i, carry):
      p, o, r, acc = carry
      batch = c.batch_fn(jax.random.fold_in(data_key, start + i))
      batch = sharding.constrain_batch(batch, mesh)
      (loss, r), g = jax.value_and_grad(loss_of, has_aux=True)(p, r, batch)
      upd, o = tx.update(g, o, p)
      return optax.apply_updates(p, upd), o, r, acc + loss
    p, o, r, acc = jax.lax.fori_loop(0, chunk, body, (p, o, r, 0.0))
    return p, o, r, acc / chunk

  return BuiltCell(graphdef=graphdef, rest=rest, init=init,
                   run_chunk=run_chunk, carries_rest=carries)


def train_cells(workdir: str, cells: Sequence[Cell], *, chunk: int,
                ckpt_every: int, stop_after_steps: int = 0,
                desc: str = "train", mesh: Optional[jax.sharding.Mesh] = None,
                fsdp_axis: Optional[str] = None
                ) -> Dict[str, Dict[str, Any]]:
  """Trains `cells` in order; returns {cell name: result dict}.

  Resume contract: a cell's whole training state (params and optimizer
  state, as lists of arrays) is one pytree saved every `ckpt_every` steps
  under checkpoints/<cell>; batches come from fold_in(data_key, step), so a
  resumed cell reproduces an uninterrupted one exactly. A finished cell
  writes cells/<cell>.json and is skipped by later runs. With
  `stop_after_steps` > 0 the run raises `Stopped` once it has trained that
  many steps (losing everything after the last checkpoint, like a kill).

  `mesh` (default: one device, "data:1"): the state is placed on it
  (replicated, or sharded over `fsdp_axis`) and each batch is sharded over
  its `data` axis; the batch sizes must be divisible by that axis (see
  `make_mesh`).
  """
  if ckpt_every % chunk:
    raise ValueError(f"`ckpt_every` ({ckpt_every}) must be a multiple of "
                     f"`chunk` ({chunk}).")
  for c in cells:
    if c.steps % chunk:
      raise ValueError(f"cell {c.name}: `steps` ({c.steps}) must be a "
                       f"multiple of `chunk` ({chunk}).")
  if mesh is None:
    mesh = sharding.make_mesh("data:1")
  fsdp_axis = fsdp_axis or None
  os.makedirs(os.path.join(workdir, "cells"), exist_ok=True)
  metrics = common.MetricsWriter(workdir)

  def ckpt_dir(c):
    return os.path.join(workdir, "checkpoints", c.name)

  n = len(cells)
  finished = sum(os.path.exists(_cell_file(workdir, c.name)) for c in cells)
  if finished:
    common.say(f"[{desc}] {finished} of {n} cells already finished "
               f"({os.path.join(workdir, 'cells')}): not recomputed")
  trained = 0
  results = {}
  offset = 0
  for i, c in enumerate(cells):
    path = _cell_file(workdir, c.name)
    if os.path.exists(path):
      with open(path) as f:
        results[c.name] = json.load(f)
      offset += c.steps
      continue
    b = build_cell(c, chunk=chunk, mesh=mesh, fsdp_axis=fsdp_axis)
    graphdef, rest, run_chunk = b.graphdef, b.rest, b.run_chunk
    p_leaves, p_def = jax.tree_util.tree_flatten(b.init["params"])
    o_leaves, o_def = jax.tree_util.tree_flatten(b.init["opt"])
    r_leaves, r_def = jax.tree_util.tree_flatten(rest)
    ckpt = common.Checkpointer(workdir,
                               subdir=os.path.join("checkpoints", c.name))
    target = {"params": p_leaves, "opt": o_leaves}
    if b.carries_rest:      # only then: other cells' checkpoints unchanged
      target["rest"] = r_leaves
    step, state = ckpt.restore_or(target)
    params = jax.tree_util.tree_unflatten(p_def, list(state["params"]))
    opt = jax.tree_util.tree_unflatten(o_def, list(state["opt"]))
    if b.carries_rest:
      rest = jax.tree_util.tree_unflatten(r_def, list(state["rest"]))
    metrics.resume_from(offset + step)
    common.log_resume(step, c.steps, what=f"cell {c.name} step")
    # One progress line set per cell: cells differ in cost per step, so a
    # rate pooled over cells gives no truthful ETA.
    label = f"{desc} {c.name} [{i + 1}/{n}]"
    progress = common.Progress(
        c.steps, start=step, desc=label,
        every=max(chunk, (c.steps // 5) // chunk * chunk))

    t0 = time.time()
    loss = None
    while step < c.steps:
      params, opt, rest, loss = run_chunk(params, opt, step, rest)
      step += chunk
      trained += chunk
      loss = float(loss)
      metrics.write(offset + step, cell=c.name, cell_step=step, loss=loss)
      progress.update(step, loss=loss)
      if step % ckpt_every == 0 or step == c.steps:
        saved = {"params": jax.tree_util.tree_leaves(params),
                 "opt": jax.tree_util.tree_leaves(opt)}
        if b.carries_rest:
          saved["rest"] = jax.tree_util.tree_leaves(rest)
        ckpt.save(step, saved)
      if stop_after_steps and trained >= stop_after_steps:
        ckpt.close()
        raise Stopped(f"stopped after {trained} steps in this run "
                      f"(cell {c.name} at step {step}); re-run to resume.")
    ckpt.close()
    if loss is None:
      # Killed after the cell's final checkpoint, before its result file:
      # nothing left to train; the last chunk's loss is in metrics.jsonl.
      loss = _final_loss(metrics, c.name, step)
    t_eval = time.time()
    common.say(f"[{label}] evaluating")
    res = {k: float(v) for k, v in
           c.eval_fn(nnx.merge(graphdef, params, rest)).items()}
    common.phase("eval")
    common.say(f"[{label}] done: trained in {t_eval - t0:.1f}s, evaluated "
               f"in {time.time() - t_eval:.1f}s; {n - i - 1} cells left")
    res.update(c.info)
    res["train_loss_final"] = loss
    res["train_time_s"] = time.time() - t0
    common.write_results(os.path.dirname(path), res,
                         name=os.path.basename(path))
    results[c.name] = common.read_results(os.path.dirname(path),
                                          os.path.basename(path))
    common.phase("cell")
    offset += c.steps
  return results


__all__ = ["BuiltCell", "Cell", "Stopped", "build_cell", "count_params",
           "ints", "make_mesh", "train_cells"]
