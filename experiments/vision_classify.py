"""Image classification with the attnjax vision backbones.

Trains the `tiny` preset (or any preset) of any model in
`attnjax.models.vision` (ViT, Swin, MaxViT, NAT, DiNAT, SHViT, agent-attention
ViT, Mixture-of-Head ViT, ...) and reports test accuracy, throughput and
parameter count. Reproduces no paper number: it is the end-to-end check that
every backbone trains, on a real image dataset that ships with an installed
package (scikit-learn's 8x8 handwritten digits, bilinearly upsampled to
`image_size`) so the default run needs no download. CIFAR-10 / ImageNet are
read through TFDS only from a local `tfds_data_dir` when asked for.

  python -m experiments.vision_classify --workdir=/tmp/vc_vit \
      --config=experiments/configs/vision_classify.py:vit

Writes DIR/results.json (test_accuracy, images_per_s, params, ...),
DIR/metrics.jsonl, DIR/curves.png (loss / accuracy), DIR/checkpoints/.
Re-running with the same workdir resumes; per-step batches and
augmentations come from jax.random.fold_in(key, step), so a killed and
re-run job ends with the same numbers as an uninterrupted one.

Devices (`--config.mesh`, helpers in experiments/sharding.py, see
docs/distributed.md): the default "data:1" is the single-device run, bit for
bit. "data:-1" (or "data:4", ...) is data parallel: each step's batch,
sampled inside the jitted step, is sharded over the `data` axis
(`sharding.constrain_batch`) and XLA all-reduces the gradients; the dataset
arrays, parameters and AdamW state are replicated, or the parameters and
their optimizer moments are sharded over `--config.fsdp_axis=data` (only
arrays of >= 2**14 elements). batch_size must be divisible by the `data` axis
size. Only the `data` axis is used: a ViT's patch tokens are not split over a
sequence axis (every block attends over all of them), so other mesh axes just
replicate the work. Numbers equal the single-device run up to float
summation order (sharded reductions). Checkpoints restore into whatever mesh
the resuming run uses, so a run started on N devices can be finished on M.
Multi-host: `sharding.maybe_initialize_distributed()` picks up SLURM / Open
MPI / TPU / JAX_COORDINATOR_ADDRESS environments. Example on 4 forced CPU
devices:

  XLA_FLAGS=--xla_force_host_platform_device_count=4 \
  python -m experiments.vision_classify --workdir=/tmp/vc_d4 \
      --config=experiments/configs/vision_classify.py:vit --config.mesh=data:4
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging
from flax import nnx

from attnjax.models import vision
from experiments import common, sharding



# ----------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------


def load_digits(image_size: int, test_fraction: float, seed: int = 0):
  """sklearn digits -> (x_train, y_train, x_test, y_test), [N, S, S, 1] float32
  standardised, a fixed stratified split."""
  from sklearn.datasets import load_digits as _ld
  d = _ld()
  x = d.images.astype(np.float32) / 16.0
  y = d.target.astype(np.int32)
  x = np.asarray(jax.image.resize(jnp.asarray(x), (x.shape[0], image_size,
                                                   image_size), "bilinear"))
  rng = np.random.RandomState(seed)
  test = np.zeros(len(y), bool)
  for c in range(10):
    idx = np.flatnonzero(y == c)
    rng.shuffle(idx)
    test[idx[:int(round(len(idx) * test_fraction))]] = True
  x = x[..., None]
  mean, std = x[~test].mean(), x[~test].std()
  x = (x - mean) / std
  return x[~test], y[~test], x[test], y[test]


def load_tfds(name: str, data_dir: str, image_size: int):
  """A locally prepared TFDS dataset (never downloads)."""
  import tensorflow_datasets as tfds
  data_dir = os.path.expanduser(data_dir)
  out = []
  for split in ("train", "test" if name != "imagenet2012" else "validation"):
    ds = tfds.load(name, split=split, data_dir=data_dir, download=False,
                   batch_size=-1, as_supervised=True)
    x, y = tfds.as_numpy(ds)
    x = x.astype(np.float32) / 255.0
    if x.shape[1] != image_size:
      x = np.asarray(jax.image.resize(
          jnp.asarray(x), (x.shape[0], image_size, image_size, x.shape[-1]),
          "bilinear"))
    out += [x, y.astype(np.int32)]
  mean = out[0].mean((0, 1, 2))
  std = out[0].std((0, 1, 2))
  out[0] = (out[0] - mean) / std
  out[2] = (out[2] - mean) / std
  return tuple(out)


def load_data(cfg):
  if cfg.dataset == "digits":
    return load_digits(cfg.image_size, cfg.test_fraction)
  if not cfg.tfds_data_dir:
    raise ValueError(
        f"dataset {cfg.dataset!r} is read from a local TFDS directory: set "
        "--config.tfds_data_dir (nothing is downloaded).")
  return load_tfds(cfg.dataset, cfg.tfds_data_dir, cfg.image_size)


def augment(key, x, max_shift: int = 2):
  """Random integer translation per image (zero fill)."""
  b, h, w, c = x.shape
  p = max_shift
  xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)), constant_values=x.min())
  off = jax.random.randint(key, (b, 2), 0, 2 * p + 1)
  return jax.vmap(lambda im, o: jax.lax.dynamic_slice(
      im, (o[0], o[1], 0), (h, w, c)))(xp, off)


# ----------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------


def make_optimizer(cfg):
  sched = optax.warmup_cosine_decay_schedule(
      0.0, cfg.lr, cfg.warmup_steps, max(cfg.steps, cfg.warmup_steps + 1),
      end_value=cfg.lr * cfg.min_lr_ratio)
  tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                   optax.adamw(sched, weight_decay=cfg.weight_decay))
  return tx, sched


def loss_fn(model, x, y, cfg):
  logits = model(x)
  labels = jax.nn.one_hot(y, logits.shape[-1])
  if cfg.label_smoothing:
    labels = optax.smooth_labels(labels, cfg.label_smoothing)
  loss = optax.softmax_cross_entropy(logits, labels).mean()
  aux = nnx.pop(model, nnx.Intermediate)      # MoH load-balancing losses
  lb = [v for p, v in jax.tree_util.tree_leaves_with_path(aux)
        if "load_balance_loss" in jax.tree_util.keystr(p)]
  total = loss + cfg.moh_balance_weight * sum(lb) if lb else loss
  acc = jnp.mean(jnp.argmax(logits, -1) == y)
  return total, (loss, acc)


def build(cfg):
  model = vision.create_model(cfg.model, cfg.preset, seed=cfg.seed,
                              img_size=cfg.image_size, in_chans=cfg.in_chans,
                              num_classes=cfg.num_classes)
  if cfg.init_from:
    # Fine-tuning: a timm checkpoint (local .safetensors; nothing downloads).
    # The sub-trees in init_skip (default: the classifier head) keep their
    # fresh initialisation; anything else that does not fit raises
    # CheckpointMismatchError naming the keys and shapes.
    skip = tuple(s for s in cfg.init_skip.split(",") if s)
    vision.load_timm(model, cfg.init_from, skip=skip)
    logging.info("initialised from %s (skipped: %s)", cfg.init_from, skip)
  tx, sched = make_optimizer(cfg)
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  return model, opt, sched


# Inference must leave the model state untouched: MoH layers sow their
# load-balancing loss as nnx.Intermediate on every call, and a sown value left
# behind by evaluation would become part of the training state (checkpointed,
# fed to the next train step, and absent from a freshly built model, so a
# resume in a new process could not restore it). Pop it inside the jit.
@nnx.jit
def _predict(model, x):
  out = jnp.argmax(model(x), -1)
  nnx.pop(model, nnx.Intermediate)
  return out


@nnx.jit
def _forward(model, x):
  out = model(x)
  nnx.pop(model, nnx.Intermediate)
  return out


def evaluate(model, x, y, batch):
  model.eval()
  correct = 0
  for i in range(0, len(x), batch):
    correct += int(jnp.sum(_predict(model, x[i:i + batch]) == y[i:i + batch]))
  model.train()
  return correct / len(x)


def throughput(model, x, batch, repeats=3):
  """Inference images/s of the jitted forward (after a warm-up call)."""
  model.eval()
  fwd = _forward
  xb = jnp.asarray(x[:batch])
  fwd(model, xb).block_until_ready()
  t0 = time.perf_counter()
  for _ in range(repeats):
    fwd(model, xb).block_until_ready()
  dt = time.perf_counter() - t0
  model.train()
  return repeats * xb.shape[0] / dt


make_mesh = sharding.mesh_from_config("batch_size")


def make_train_step(cfg, key, xtr, ytr, mesh):
  """The jitted AdamW step `(model, opt, step) -> (loss, acc)`.

  The batch of step s is drawn on device from fold_in(key, s) out of the
  (replicated) training arrays `xtr`, `ytr` and sharded over the mesh's
  `data` axis (a no-op constraint when that axis has size 1).
  """
  @nnx.jit
  def train_step(model, opt, step):
    k = jax.random.fold_in(key, step)
    kb, ka = jax.random.split(k)
    idx = jax.random.randint(kb, (cfg.batch_size,), 0, xtr.shape[0])
    x, y = xtr[idx], ytr[idx]
    x, y = sharding.constrain_batch((x, y), mesh)
    if cfg.augment:
      x = augment(ka, x)
    (_, (loss, acc)), grads = nnx.value_and_grad(
        loss_fn, has_aux=True)(model, x, y, cfg)
    opt.update(model, grads)
    return loss, acc

  return train_step


def train(cfg, workdir: str):
  # Multi-host: before any jax computation (no-op on a single host).
  if not jax.distributed.is_initialized():
    sharding.maybe_initialize_distributed()
  mesh = make_mesh(cfg)
  xtr, ytr, xte, yte = load_data(cfg)
  model, opt, sched = build(cfg)
  params = vision.count_params(model)
  # On the mesh before building the restore target: orbax then reads the
  # checkpoint straight into this mesh, whatever device count wrote it.
  sharding.shard_nnx(model, opt, mesh=mesh, fsdp_axis=cfg.fsdp_axis or None)
  ckpt = common.Checkpointer(workdir)
  metrics = common.MetricsWriter(workdir)
  init = {"step": np.array(0, np.int32), "state": common.nnx_state(model, opt),
          "elapsed": np.array(0.0, np.float64)}
  start, state = ckpt.restore_or(init)
  if start:
    common.nnx_load([model, opt], state["state"])
    common.log_resume(start, cfg.steps)
  elapsed0 = float(state["elapsed"])
  metrics.resume_from(start if start else -1)
  model.train()
  key = jax.random.key(cfg.seed)
  xtr_j, ytr_j = sharding.replicate((xtr, ytr), mesh)
  train_step = make_train_step(cfg, key, xtr_j, ytr_j, mesh)

  prog = common.Progress(cfg.steps, start=start, every=max(cfg.eval_every // 2, 1),
                         desc=f"{cfg.model}/{cfg.preset}")
  t0 = time.time()
  step = start
  run_limit = cfg.stop_after_steps if cfg.stop_after_steps > 0 else None
  while step < cfg.steps:
    loss, acc = train_step(model, opt, jnp.int32(step))
    step += 1
    prog.update(step, loss=loss, acc=acc)
    if step % cfg.eval_every == 0 or step == cfg.steps:
      test_acc = evaluate(model, xte, yte, cfg.eval_batch)
      metrics.write(step, train_loss=loss, train_acc=acc, test_acc=test_acc,
                    lr=sched(step))
    if step % cfg.ckpt_every == 0 or step == cfg.steps:
      ckpt.save(step, {"step": np.array(step, np.int32),
                       "state": common.nnx_state(model, opt),
                       "elapsed": np.array(elapsed0 + time.time() - t0, np.float64)})
    if run_limit is not None and step - start >= run_limit and step < cfg.steps:
      logging.info("stopping after %d steps (stop_after_steps)", run_limit)
      ckpt.close()
      return None
  train_time = elapsed0 + time.time() - t0
  test_acc = evaluate(model, xte, yte, cfg.eval_batch)
  ips = throughput(model, xte, min(cfg.eval_batch, len(xte)))
  recs = metrics.read()
  results = {
      "model": cfg.model, "preset": cfg.preset, "dataset": cfg.dataset,
      "image_size": cfg.image_size, "steps": cfg.steps,
      "batch_size": cfg.batch_size, "params": params,
      "test_accuracy": test_acc,
      "final_train_loss": recs[-1]["train_loss"] if recs else None,
      "throughput_images_per_s": ips,
      "train_time_s": train_time,
      "num_train": int(len(xtr)), "num_test": int(len(xte)),
  }
  # Figures first: results.json marks a completed run (common.finished_run).
  plot(recs, workdir, f"{cfg.model} ({cfg.preset}) on {cfg.dataset}")
  common.write_results(workdir, results)
  ckpt.close()
  return results


def plot(recs, workdir, title):
  plt = common.setup_matplotlib()
  fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
  s = [r["step"] for r in recs]
  ax[0].plot(s, [r["train_loss"] for r in recs], "o-")
  ax[0].set_xlabel("step")
  ax[0].set_ylabel("train loss")
  ax[0].set_yscale("log")
  ax[1].plot(s, [r["train_acc"] for r in recs], "o-", label="train (batch)")
  ax[1].plot(s, [r["test_acc"] for r in recs], "s-", label="test")
  ax[1].set_xlabel("step")
  ax[1].set_ylabel("accuracy")
  ax[1].legend()
  fig.suptitle(title)
  common.save_figure(fig, workdir, "curves.png")


def main(argv):
  del argv
  if not flags.FLAGS.workdir:
    raise app.UsageError("--workdir is required.")
  cfg = flags.FLAGS.config
  common.setup_logging()
  try:
    common.validate_config(cfg)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  if os.path.exists(os.path.join(flags.FLAGS.workdir, "config.json")):
    common.guard_config(flags.FLAGS.workdir, cfg)   # same run, or refused
    if common.finished_run(flags.FLAGS.workdir) is not None:
      return
  with common.recorded_run(flags.FLAGS.workdir, cfg):
    res = train(cfg, flags.FLAGS.workdir)
  if res is not None:
    print(f"{cfg.model}: test_accuracy={res['test_accuracy']:.4f} "
          f"params={res['params']} images/s={res['throughput_images_per_s']:.0f}")


if __name__ == "__main__":
  common.define_study_flags("vision_classify.py", preset="vit")
  app.run(main)
