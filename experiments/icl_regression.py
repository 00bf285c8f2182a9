r"""In-context linear regression with multi-head softmax attention.

Reproduces He, Pan, Chen & Yang, "In-Context Linear Regression Demystified:
Training Dynamics and Mechanistic Interpretability of Multi-Head Softmax
Attention" (ICML 2025, arXiv 2503.12734).

Setup (paper): x_i, x_q ~ N(0, I_d) (or N(0, Sigma), Sigma_ij = rho^|i-j|),
beta ~ N(0, I_d / d), y = beta^T x + eps, eps ~ N(0, sigma^2 = 0.1) on the
context *and* the query target; d = 5, L = 40; tokens z_i = (x_i, y_i),
query (x_q, 0) attending only to the L context tokens; no positional
encoding; fresh samples every step. Model `attnjax.models.icl.ICLAttention`:
one layer, H heads, full (d+1)x(d+1) Q_h, K_h, V_h, a 1x(d+1) O_h, scale
1/sqrt(d+1); softmax-free variants: 'linear' (softmax removed, as in the
paper's linear-transformer comparison) and 'linear_norm' (also / L).
Adam, lr 1e-3, batch 256, squared loss on the query target.

Reproduced: test MSE per H and loss curves; the KQ / OV patterns (diagonal
and homogeneous KQ x-block, last-entry-only and zero-sum OV); the reduced
model (omega_h, mu_h) against the debiased-GD, one-step GD, single-head
kernel and ridge (Bayes-optimal) predictors for L in {10, 40, 100}; length
generalization (softmax vs linear attention, trained at L = 40); with
`rho > 0` a preconditioned-GD analysis; with `num_tasks = 2` the multi-task
superposition analysis.

Run (presets and commands in experiments/configs/icl_regression.py):

  python -m experiments.icl_regression --workdir=DIR \
      [--config=experiments/configs/icl_regression.py:PRESET] [--config.k=v]

Re-running with the same DIR resumes every run from DIR/checkpoints/<run>;
final numbers equal an uninterrupted run (per-step data from
fold_in(key, step), full training state checkpointed).

Devices (`--config.mesh`, helpers in experiments/sharding.py, see
docs/distributed.md): the default "data:1" is the single-device run.
"data:-1" (or "data:4", ...) is data parallel: each step's batch, sampled
inside the jitted scan, is sharded over the `data` axis
(`sharding.constrain_batch`) and XLA all-reduces the gradients; parameters
and Adam state are replicated, or sharded over `--config.fsdp_axis=data`
(only arrays of >= 2**14 elements, so at the paper's sizes they all stay
replicated). batch_size must be divisible by the `data` axis size. Other mesh
axes are not used by this model (the work is replicated over them). Numbers
equal the single-device run up to float summation order (sharded
reductions). Checkpoints restore into whatever mesh the resuming run uses,
so a run started on N devices can be finished on M. Multi-host:
`sharding.maybe_initialize_distributed()` picks up SLURM / Open MPI / TPU /
JAX_COORDINATOR_ADDRESS environments.

results.json keys (H are strings; 'L' keys are context lengths as strings):
  config                      the config used
  heads, linear_heads         trained head counts (linear_variants: which
                              softmax-free kinds were trained)
  test_mse[H]                 test MSE of the softmax model with H heads (at
                              the training L, fresh prompts, query noise in;
                              multi-task: summed over the tasks)
  test_mse_linear[H]          same for the linear-attention model (softmax
                              removed); test_mse_linear_norm[H] for the
                              1/L-normalized one when trained
  kq_diag_ratio_weighted[H],  the same three, averaged over heads with
  ov_last_entry_ratio_weighted[H]   weights ||OV_h|| (small heads count less)
  kq_diag_ratio[H]            mean over active heads of ||diag KQ_x|| /
                              ||KQ_x||_F (KQ_x: the d x d covariate block of
                              KQ_h = K_h^T Q_h / sqrt(d+1))
  kq_diag_norm_var[H]         mean over active heads of Var(diag KQ_x) /
                              mean(diag(KQ_x)^2)  (0 = homogeneous)
  ov_last_entry_ratio[H]      mean over active heads of |OV_h[-1]| / ||OV_h||
                              (OV_h = V_h^T O_h^T)
  ov_zero_sum[H]              |sum_h OV_h[-1]| / sum_h |OV_h[-1]| over active
                              heads (0 = exact zero-sum)
  ov_last_sum[H]              sum_h OV_h[-1] over active heads (raw)
  num_active_heads[H]         heads with ||OV_h|| >= active_threshold * max
  head_metrics[H]             per-head lists: kq_diag_ratio, kq_diag_mean
                              (= omega_h), kq_diag_norm_var,
                              ov_last_entry_ratio, ov_last_entry (= mu_h),
                              active
  baselines[L][name]          Monte-Carlo MSE of ridge (Bayes-optimal,
                              lambda = sigma^2 d), gd (one-step GD, step size
                              tuned), debiased_gd (step tuned),
                              single_head_kernel (mu sum_l y_l softmax(omega
                              x_l.x_q), omega and mu tuned), at each L in
                              reduced_lengths; gd_eta, debiased_gd_eta: the
                              tuned step sizes
  baseline_mse                the same at the training L (flat dict)
  reduced_model[H]            omega, mu (per head); eta_heads = sum_h mu_h
                              omega_h (the implied debiased-GD step, compare
                              baselines[L]['debiased_gd_eta']), mu_sum;
                              mse_model[L],
                              mse_reduced[L] (reduced model with the fitted
                              omega_h, mu_h), mse_dgd_from_heads[L] (debiased
                              GD with step sum_h mu_h omega_h, mean-y weight
                              sum_h mu_h: the reduced model's linearization),
                              rel_gap_reduced[L], rel_gap_dgd[L] (E(f_model -
                              f)^2 / E y^2)
  length_generalization       lengths; mse[name] lists over lengths for
                              softmax_h{H}, linear_h{H}, linear_norm_h{H},
                              ridge,
                              debiased_gd_tuned (step tuned per L),
                              debiased_gd_fixed (step tuned at training L)
  noniso[H] (rho > 0)         cos_gamma_sigma_inv, cos_gamma_identity,
                              cos_gamma_fitted: cosine similarity of the
                              heads' effective preconditioner
                              Gamma = sum_h mu_h KQ_h,x with Sigma^-1, I, and
                              the least-squares-optimal one-step debiased
                              preconditioner Gamma*; mse_gamma_heads,
                              mse_gamma_fitted
  multitask[H] (num_tasks>1)  task_share (per active head, readout of task 1
                              over both), superposition_index (mean over
                              active heads of 1 - |2 share - 1|: 0 = each head
                              serves one task, 1 = every head serves both),
                              regime, test_mse_per_task
  estimators                  the authors' comparison (plots.ipynb cell 1)
                              on estimator_lengths: lengths, mse[name]
                              lists for trained_<run>, reduced_trained_h{H}
                              (reduced model with the trained omega_h,
                              mu_h), reduced_authors (omega = +-0.13, mu =
                              +-3.45), gd_authors / debiased_gd_authors
                              (step 2 omega mu), gd_tuned /
                              debiased_gd_tuned (step fitted on the
                              evaluation prompts), kernel_authors (omega =
                              1/sqrt(d), mu = sqrt(d)/(1+(1+s2) d e/L)),
                              kernel_trained_h1, ridge
  gradient_flow[H]            the reduced model's gradient flow (the
                              authors' ODE) from the trained model's
                              (omega, mu) at step 0: omega, mu, t paths,
                              omega_end, mu_end, loss_end, and the trained
                              end point omega_trained, mu_trained with its
                              reduced loss loss_trained_params
  dummy_heads                 rule (the 'active' rule); per H: num_active,
                              active, ov_norm_rel, omega, mu, groups
                              (positive / negative omega: heads,
                              omega_spread, mu_sum), rel_gap_to_h2
                              (E(f_H - f_2)^2 / E y^2), strict_two_active
  wall_time_s                 wall time of this invocation
Figures: loss_curves.png, kq_ov_heads_h{H}.png (one colour scale per row,
colorbars), kq_evolution_h{H}.png (KQ at steps 0, 1, 2, 10, 100, 500 x
log_every and the last), trajectories.png, gradient_flow.png,
predictors.png, estimators.png, length_generalization.png. Curves:
metrics.jsonl, one line per log step with train_loss/<run> (mean over the
logged chunk), omega/<run> and mu/<run> (per-head lists), kq/<run> (full
KQ matrices at the snapshot steps), runs named softmax_h{H} and linear_h{H}.

Training step: all runs' heads are stacked on one axis and trained by one
jitted `lax.scan` over log_every steps (one dispatch per chunk,
checkpoints at chunk boundaries); the forward is reassociated (only the
query attends: scores Z^T (K_h^T Q_h z_q), output O_h V_h (Z p), no
projection of context tokens; `attnjax.models.icl.stacked_icl_forward`),
one Adam update covers all runs (elementwise: identical to per-run Adam),
and prompts come from one `fast_normal` draw (a counter hash + Box-Muller,
instead of Threefry per sample). `python -m experiments.bench_icl` times it
against the original step in one process.
"""

from __future__ import annotations

import math
import os
import resource
import time
from typing import Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app
from flax import nnx

from attnjax.analysis import kq_ov
from attnjax.models.icl import (ICLAttention, stack_head_params,
                                stacked_icl_forward, unstack_head_params)
from experiments import common, sharding



def _ints(s) -> List[int]:
  if isinstance(s, (list, tuple)):
    return [int(v) for v in s]
  s = str(s).strip()
  return [int(v) for v in s.split(",") if v.strip()] if s else []


def _supports(cfg) -> List[List[int]]:
  if cfg.num_tasks == 1:
    return [list(range(cfg.d))]
  sup = [[int(i) for i in g.split(",")] for g in cfg.task_supports.split(";")]
  if len(sup) != cfg.num_tasks or any(max(g) >= cfg.d for g in sup):
    raise ValueError(f"task_supports {cfg.task_supports!r} must give "
                     f"{cfg.num_tasks} index lists within [0, {cfg.d}).")
  return sup


def covariance(d: int, rho: float) -> np.ndarray:
  i = np.arange(d)
  return rho ** np.abs(i[:, None] - i[None, :])


# ----------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------


def _mix32(x):
  """A 32-bit integer hash with full avalanche (Wellons' 'lowbias32')."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def cos_sin_turns(k):
  """(cos, sin) of 2 pi k / 2^24 for integers 0 <= k < 2^24, float32.

  Exact integer range reduction to the nearest quarter turn, then Cephes'
  float32 minimax polynomials on [-pi/4, pi/4] (max error ~1e-7, below the
  ~4e-7 of jnp.cos on the rounded float angle). XLA on CPU calls scalar libm
  sinf/cosf for jnp.sin/jnp.cos; in the training step those calls were the
  largest single cost. Checked against float64 NumPy in the tests.
  """
  k = k.astype(jnp.int32)
  q = (k + (1 << 21)) >> 22                      # nearest quarter turn, 0..4
  x = (k - (q << 22)).astype(jnp.float32) * (2.0 * math.pi / 2 ** 24)
  x2 = x * x
  s = x + x * x2 * (-1.6666654611e-1 + x2 * (8.3321608736e-3 +
                                            x2 * -1.9515295891e-4))
  c = 1.0 - 0.5 * x2 + x2 * x2 * (4.166664568298827e-2 + x2 * (
      -1.388731625493765e-3 + x2 * 2.443315711809948e-5))
  q = q & 3
  cos_t = jnp.where(q == 0, c, jnp.where(q == 1, -s, jnp.where(q == 2, -c, s)))
  sin_t = jnp.where(q == 0, s, jnp.where(q == 1, c, jnp.where(q == 2, -s, -c)))
  return cos_t, sin_t


def _box_muller_bits(key, shape):
  """Hash bits of a Box-Muller draw of `shape`: (n, radius, 24-bit turns)."""
  n = int(np.prod(shape))
  m = (n + 1) // 2
  seed = jax.random.bits(key, (2,), jnp.uint32)
  i = jax.lax.iota(jnp.uint32, 2 * m).reshape(2, m)
  b = _mix32(_mix32(i ^ seed[0]) + seed[1])
  u1 = ((b[0] >> 8).astype(jnp.float32) + 0.5) * (1.0 / 2 ** 24)  # (0, 1)
  return n, jnp.sqrt(-2.0 * jnp.log(u1)), b[1] >> 8


def fast_normal(key, shape) -> jax.Array:
  """Standard normal float32 samples, ~5x cheaper than jax.random.normal on CPU.

  Two 32-bit words from Threefry(key) seed a counter-based hash
  (u_i = mix(mix(i ^ s0) + s1), `_mix32`), and Box-Muller turns pairs of
  24-bit uniforms (u1, k) into normals sqrt(-2 log u1) (cos, sin)(2 pi k /
  2^24), the trigonometric part by `cos_sin_turns` (polynomials, no libm
  calls). Threefry on every sample was the largest cost of the original
  step (the model itself is ~17 heads of 6x6 matrices). The samples are
  computed once (optimization_barrier: XLA would otherwise recompute them
  inside every consumer's fusion). Deterministic in `key`; checked against
  the normal law and against the float64 Box-Muller of the same hash bits
  in tests/test_icl_regression.py.
  """
  n, r, turns = _box_muller_bits(key, shape)
  cos_t, sin_t = cos_sin_turns(turns)
  z = jnp.concatenate([r * cos_t, r * sin_t])
  return jax.lax.optimization_barrier(z[:n].reshape(shape))


def fast_normal_libm(key, shape) -> jax.Array:
  """`fast_normal` as it was before: the same hash bits, jnp.cos/jnp.sin.

  Kept for the benchmark's side-by-side timing and the equality test.
  """
  n, r, turns = _box_muller_bits(key, shape)
  th = turns.astype(jnp.float32) * (2.0 * math.pi / 2 ** 24)
  z = jnp.concatenate([r * jnp.cos(th), r * jnp.sin(th)])
  return z[:n].reshape(shape)


class Task:
  """Samples prompts: x [B, L, d], y [B, L, T], xq [B, d], yq [B, T]."""

  def __init__(self, cfg):
    self.d, self.T, self.sigma2 = cfg.d, cfg.num_tasks, float(cfg.sigma2)
    self.sigma = covariance(cfg.d, cfg.rho) if cfg.rho > 0 else np.eye(cfg.d)
    self.chol = (np.linalg.cholesky(self.sigma).astype(np.float32)
                 if cfg.rho > 0 else None)
    self.supports = _supports(cfg)
    # beta_t ~ N(0, I_S / |S|) ('normalized', the paper's single task) or
    # N(0, I_S) ('unit', the authors' multi-task notebook).
    unit = cfg.get("beta_scaling", "normalized") == "unit"
    mask = np.zeros((self.T, self.d), np.float32)
    for t, g in enumerate(self.supports):
      mask[t, g] = 1.0 if unit else 1.0 / math.sqrt(len(g))
    self.beta_scale = mask
    # Noise sd per task: sigma, or sigma sqrt(|S_t|) ('support': the authors'
    # multi-task notebook, same SNR as normalized beta with sigma).
    sd = math.sqrt(self.sigma2)
    per_support = cfg.get("noise_scaling", "fixed") == "support"
    self.noise_sd = np.array([sd * (math.sqrt(len(g)) if per_support else 1.0)
                              for g in self.supports], np.float32)
    self.query_noise = bool(cfg.get("query_noise", True))

  def _draw(self, normal, key, batch: int, length: int):
    """Covariates [B, L+1, d], beta [B, T, d] and noise [B, L+1, T] as
    slices of one `normal(key, shape)` draw (query = position L)."""
    nx, nb = batch * (length + 1) * self.d, batch * self.T * self.d
    ne = batch * (length + 1) * self.T
    z = normal(key, (nx + nb + ne,))
    xa = z[:nx].reshape(batch, length + 1, self.d)
    if self.chol is not None:
      xa = xa @ self.chol.T
    beta = z[nx:nx + nb].reshape(batch, self.T, self.d) * self.beta_scale
    noise = z[nx + nb:].reshape(batch, length + 1, self.T) * self.noise_sd
    if not self.query_noise:
      noise = noise.at[:, length].set(0.0)
    return xa, beta, noise

  def sample(self, key, batch: int, length: int):
    """One prompt batch: x [B, L, d], y [B, L, T], xq [B, d], yq [B, T].

    The same distribution as `sample_reference` (the original sampler) from
    one `fast_normal` draw: covariates of context and query, beta and the
    noise of context and query are slices of it.
    """
    xa, beta, noise = self._draw(fast_normal, key, batch, length)
    # y = x . beta as d multiply-adds (XLA CPU runs the batched [L+1, d] x
    # [d, T] dot as a slow per-prompt kernel).
    ya = xa[..., None, 0] * beta[:, None, :, 0]
    for j in range(1, self.d):
      ya = ya + xa[..., None, j] * beta[:, None, :, j]
    ya = ya + noise
    return xa[:, :length], ya[:, :length], xa[:, length], ya[:, length]

  def sample_previous(self, key, batch: int, length: int):
    """`sample` as it was before the polynomial sin/cos (benchmarks, tests).

    Box-Muller through jnp.cos/jnp.sin (scalar libm calls on CPU), not
    materialized, and y from a batched dot: the same numbers as `sample` up
    to float32 rounding (~1e-6).
    """
    xa, beta, noise = self._draw(fast_normal_libm, key, batch, length)
    ya = jnp.einsum("bld,btd->blt", xa, beta) + noise
    return xa[:, :length], ya[:, :length], xa[:, length], ya[:, length]

  def sample_reference(self, key, batch: int, length: int):
    """The sampler of the original step (five draws); used by benchmarks."""
    kx, kq, kb, ke, keq = jax.random.split(key, 5)
    x = jax.random.normal(kx, (batch, length, self.d))
    xq = jax.random.normal(kq, (batch, self.d))
    if self.chol is not None:
      x = x @ self.chol.T
      xq = xq @ self.chol.T
    beta = jax.random.normal(kb, (batch, self.T, self.d)) * self.beta_scale
    sd = math.sqrt(self.sigma2)
    y = jnp.einsum("bld,btd->blt", x, beta) + sd * jax.random.normal(
        ke, (batch, length, self.T))
    yq = jnp.einsum("bd,btd->bt", xq, beta) + sd * jax.random.normal(
        keq, (batch, self.T))
    return x, y, xq, yq


def tokens(x, y, xq):
  zc = jnp.concatenate([x, y], axis=-1)
  zq = jnp.concatenate([xq, jnp.zeros(xq.shape[:-1] + (y.shape[-1],),
                                      xq.dtype)], axis=-1)
  return zq, zc


# ----------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------


class Run:
  """One model (attention kind, H): parameters, loss and predictions."""

  def __init__(self, cfg, task: Task, attention: str, num_heads: int):
    self.cfg, self.task = cfg, task
    self.attention, self.H = attention, num_heads
    self.name = f"{attention}_h{num_heads}"
    tag = {"softmax": 0, "linear": 1000, "linear_norm": 2000}[attention]
    tag += num_heads
    init_seed = int(jax.random.randint(jax.random.fold_in(
        jax.random.fold_in(jax.random.key(cfg.seed), 2), tag), (), 0,
        2**31 - 1))
    model = ICLAttention(cfg.d, num_heads, num_tasks=cfg.num_tasks,
                         attention=attention, rngs=nnx.Rngs(init_seed))
    self.scale = model.scale
    self.graphdef, state = nnx.split(model)
    self._template = state
    self.params0 = state.to_pure_dict()
    self._predict = jax.jit(self._predict_impl)

  def model(self, params) -> ICLAttention:
    st = jax.tree_util.tree_map(lambda v: v, self._template)
    nnx.replace_by_pure_dict(st, params)
    return nnx.merge(self.graphdef, st)

  def loss(self, params, batch):
    x, y, xq, yq = batch
    zq, zc = tokens(x, y, xq)
    pred = self.model(params)(zq, zc)
    return jnp.mean(jnp.sum((pred - yq) ** 2, axis=-1))

  def _predict_impl(self, params, zq, zc, mask):
    # The reassociated forward (equal to self.model(params)(zq, zc, mask)).
    heads = stacked_icl_forward(stack_head_params([params]), zq, zc,
                                scale=self.scale,
                                head_kind=[self.attention] * self.H,
                                mask=mask)
    return jnp.sum(heads, axis=1)

  def predict(self, params, zq, zc, mask, chunk: int):
    outs = []
    for s in range(0, zq.shape[0], chunk):
      outs.append(self._predict(params, zq[s:s + chunk], zc[s:s + chunk],
                                mask[s:s + chunk]))
    return np.asarray(jnp.concatenate(outs, 0), np.float64)

  def merged(self, params) -> Tuple[np.ndarray, np.ndarray]:
    kq, ov = self.model(params).merged_matrices()
    return np.asarray(kq, np.float64), np.asarray(ov, np.float64)


Stopped = common.Stopped


class Stack:
  """All runs' heads stacked on one axis: the fast training step.

  Parameters live as {'query', 'key', 'value': [D, N, D], 'out': [N, D, T]}
  (N = heads of all runs; `attnjax.models.icl.stack_head_params`), the
  forward is the reassociated `stacked_icl_forward` (only the query attends:
  no projection of context tokens), and one loss -- the sum of the runs'
  losses, whose gradient in a run's parameters is that run's own gradient --
  drives one Adam update (elementwise, so identical to per-run Adam).
  """

  def __init__(self, runs):
    self.runs = list(runs)
    self.num_heads = [r.H for r in self.runs]
    self.kinds = tuple(k for r in self.runs for k in [r.attention] * r.H)
    onehot = np.zeros((sum(self.num_heads), len(self.runs)), np.float32)
    onehot[np.arange(onehot.shape[0]),
           np.repeat(np.arange(len(self.runs)), self.num_heads)] = 1.0
    self.onehot = onehot                      # [N, M]: head -> its run
    self.scale = self.runs[0].scale

  def stack(self, params_by_name):
    return stack_head_params([params_by_name[r.name] for r in self.runs])

  def unstack(self, stacked):
    return {r.name: p for r, p in zip(
        self.runs, unstack_head_params(stacked, self.num_heads))}

  def predict(self, stacked, zq, zc, mask=None):
    """[B, M, T]: every run's prediction."""
    heads = stacked_icl_forward(stacked, zq, zc, scale=self.scale,
                                head_kind=self.kinds, mask=mask)
    return jnp.einsum("bnt,nm->bmt", heads, self.onehot)

  def losses(self, stacked, batch):
    """[M]: each run's mean squared error (summed over tasks)."""
    x, y, xq, yq = batch
    zq, zc = tokens(x, y, xq)
    pred = self.predict(stacked, zq, zc)
    return jnp.mean(jnp.sum((pred - yq[:, None, :]) ** 2, axis=-1), axis=0)

  def total_loss(self, stacked, batch):
    l = self.losses(stacked, batch)
    return jnp.sum(l), l


def make_optimizer(cfg):
  """Adam with the config's (PyTorch-default) settings."""
  return optax.adam(cfg.lr, b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps)


def make_step(cfg, task, stack, tx, mesh=None, sample=None):
  """(params, opt, step) -> (params, opt, losses [M]): one fast Adam step.

  `sample` (default `task.sample`) draws the step's batch; the benchmark
  passes `task.sample_previous` to time the step as it was before the
  polynomial sampler.
  """
  data_key = jax.random.fold_in(jax.random.key(cfg.seed), 1)
  sample = task.sample if sample is None else sample

  def step_fn(p, o, step):
    batch = sample(jax.random.fold_in(data_key, step), cfg.batch_size, cfg.L)
    if mesh is not None:
      batch = sharding.constrain_batch(batch, mesh)
    (_, losses), g = jax.value_and_grad(stack.total_loss, has_aux=True)(
        p, batch)
    upd, o = tx.update(g, o, p)
    return optax.apply_updates(p, upd), o, losses

  return step_fn


def _make_chunk(cfg, task, stack, tx, mesh, sample=None):
  """jit(params, opt, start, n) -> n fast Adam steps of every run.

  All models see the same batch at each step (drawn from
  fold_in(data_key, step)), so the H comparison is paired; the batch is
  sharded over the mesh's `data` axis (a no-op with one device). One
  dispatch runs n steps (lax.scan); checkpoints fall on chunk boundaries.
  """
  step_fn = make_step(cfg, task, stack, tx, mesh, sample)

  def chunk(params, opt, start, n):
    def body(carry, i):
      p, o, l = step_fn(*carry, start + i)
      return (p, o), l

    (params, opt), losses = jax.lax.scan(body, (params, opt), jnp.arange(n))
    return params, opt, jnp.mean(losses, axis=0)

  return jax.jit(chunk, static_argnums=(3,))


def make_reference_chunk(cfg, task, runs, tx):
  """The original step (before the reassociated one), kept as reference.

  Per run: the `ICLAttention` module (projects every context token),
  its own value_and_grad and Adam update, on `Task.sample_reference` data.
  `experiments/bench_icl.py` times it against `_make_chunk`, and the tests
  check that both give the same losses and gradients.
  """
  data_key = jax.random.fold_in(jax.random.key(cfg.seed), 1)

  def chunk(params, opt, start, n):
    def body(carry, i):
      p, o = carry
      batch = task.sample_reference(jax.random.fold_in(data_key, start + i),
                                    cfg.batch_size, cfg.L)
      losses, new_p, new_o = {}, {}, {}
      for run in runs:
        loss, g = jax.value_and_grad(run.loss)(p[run.name], batch)
        upd, new_o[run.name] = tx.update(g, o[run.name], p[run.name])
        new_p[run.name] = optax.apply_updates(p[run.name], upd)
        losses[run.name] = loss
      return (new_p, new_o), losses

    (params, opt), losses = jax.lax.scan(body, (params, opt), jnp.arange(n))
    return params, opt, jax.tree_util.tree_map(jnp.mean, losses)

  return jax.jit(chunk, static_argnums=(3,))


make_mesh = sharding.mesh_from_config("batch_size")


def train(cfg, task, runs, workdir: str) -> dict:
  """Trains all runs jointly with checkpoint/resume; returns their params."""
  if cfg.ckpt_every % cfg.log_every:
    raise ValueError(f"ckpt_every ({cfg.ckpt_every}) must be a multiple of "
                     f"log_every ({cfg.log_every}).")
  mesh = make_mesh(cfg)
  tx = make_optimizer(cfg)
  stack = Stack(runs)
  params = stack.stack({r.name: r.params0 for r in runs})
  init = {"params": params, "opt": tx.init(params)}
  # On the mesh before building the restore target: orbax then reads the
  # checkpoint straight into this mesh, whatever device count wrote it.
  init = sharding.shard_tree(init, mesh, fsdp_axis=cfg.fsdp_axis or None)
  leaves0, treedef = jax.tree_util.tree_flatten(init)
  ckpt = common.Checkpointer(workdir)
  step, saved = ckpt.restore_or({"step": np.zeros((), np.int64),
                                 "leaves": leaves0})
  state = jax.tree_util.tree_unflatten(treedef, saved["leaves"])
  params, opt = state["params"], state["opt"]
  writer = common.MetricsWriter(workdir)
  writer.resume_from(step if step > 0 else -1)
  if step == 0:
    _log(cfg, writer, runs, 0, stack.unstack(params), None)
  if step >= cfg.steps:
    print(f"training already complete ({step}/{cfg.steps} steps in "
          f"{workdir}/checkpoints); skipping to evaluation", flush=True)
  chunk = _make_chunk(cfg, task, stack, tx, mesh)
  prog = common.Progress(cfg.steps, start=step, every=cfg.log_every,
                         desc="train " + ",".join(r.name for r in runs))
  step0, wall0, cpu0 = step, time.time(), _cpu_seconds()
  while step < cfg.steps:
    n = min(cfg.log_every, cfg.steps - step)
    params, opt, losses = chunk(params, opt, jnp.asarray(step), n)
    step += n
    losses = {r.name: float(v) for r, v in zip(runs, np.asarray(losses))}
    _log(cfg, writer, runs, step, stack.unstack(params), losses)
    # Elapsed wall and CPU seconds (getrusage, this process) and the 1-min
    # load average ride along on each progress line.
    prog.update(step, **losses, wall_s=time.time() - wall0,
                cpu_s=_cpu_seconds() - cpu0, load1=os.getloadavg()[0])
    if step % cfg.ckpt_every == 0 or step == cfg.steps:
      ckpt.save(step, {"step": np.asarray(step, np.int64),
                       "leaves": jax.tree_util.tree_leaves(
                           {"params": params, "opt": opt})})
    if cfg.stop_after_steps and step >= cfg.stop_after_steps and \
        step < cfg.steps:
      ckpt.close()
      raise Stopped(f"stopped at step {step} (stop_after_steps)")
  ckpt.close()
  if step > step0:
    wall, cpu = time.time() - wall0, _cpu_seconds() - cpu0
    print(f"training: steps {step0}->{step} in {wall:.1f} s wall, {cpu:.1f} s "
          f"CPU (getrusage), {(step - step0) / wall:.1f} steps/s wall, "
          f"{(step - step0) / max(cpu, 1e-9):.1f} steps per CPU-second, "
          f"load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}",
          flush=True)
  return stack.unstack(params)


def _cpu_seconds() -> float:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def snapshot_steps(cfg) -> List[int]:
  """Steps whose full KQ matrices are logged (the evolution figure).

  The authors' evolution figure shows log indices 0, 1, 2, 10, 100, 500 of
  their 1000-step log (steps 0, 1k, 2k, 10k, 100k, 500k); here the same
  multiples of log_every that fall within the run, plus the last step.
  """
  return sorted({m * cfg.log_every for m in (0, 1, 2, 10, 100, 500)
                 if m * cfg.log_every <= cfg.steps} | {cfg.steps})


def _log(cfg, writer, runs, step, params, losses):
  """metrics.jsonl line: per run the loss, omega_h and mu_h of each head."""
  d = cfg.d
  rec = {}
  for run in runs:
    kq, ov = run.merged(params[run.name])
    rec[f"omega/{run.name}"] = kq_ov.diagonal_mean(kq[:, :d, :d]).tolist()
    rec[f"mu/{run.name}"] = ov[:, d, 0].tolist()
    if step in snapshot_steps(cfg):
      rec[f"kq/{run.name}"] = kq.tolist()
    if losses is not None:
      rec[f"train_loss/{run.name}"] = float(losses[run.name])
  writer.write(step, **rec)


# ----------------------------------------------------------------------------
# Predictors (float64 NumPy on the evaluation prompts)
# ----------------------------------------------------------------------------


def ridge_predict(x, y, xq, lam):
  """Posterior mean under beta ~ N(0, I/d): (X^T X + lam I)^-1 X^T y."""
  xtx = np.einsum("bld,ble->bde", x, x) + lam * np.eye(x.shape[-1])
  xty = np.einsum("bld,bl->bd", x, y)
  beta = np.linalg.solve(xtx, xty[..., None])[..., 0]
  return np.einsum("bd,bd->b", beta, xq)


def gd_feature(x, y, xq):
  return np.einsum("bl,bld,bd->b", y, x, xq) / x.shape[1]


def debiased_gd_feature(x, y, xq):
  yc = y - y.mean(axis=1, keepdims=True)
  return np.einsum("bl,bld,bd->b", yc, x, xq) / x.shape[1]


def kernel_feature(x, y, xq, omega):
  s = omega * np.einsum("bld,bd->bl", x, xq)
  s = s - s.max(axis=1, keepdims=True)
  w = np.exp(s)
  w /= w.sum(axis=1, keepdims=True)
  return np.einsum("bl,bl->b", w, y)


def reduced_predict(x, y, xq, omega, mu):
  return sum(m * kernel_feature(x, y, xq, o) for o, m in zip(omega, mu))


def _fit_scale(f, target):
  return float(np.dot(f, target) / max(np.dot(f, f), 1e-30))


def _mse(pred, target):
  return float(np.mean((pred - target) ** 2))


# ----------------------------------------------------------------------------
# Study
# ----------------------------------------------------------------------------


def _eval_set(cfg, task, salt: int, length: int):
  key = jax.random.fold_in(jax.random.key(cfg.seed), salt)
  x, y, xq, yq = task.sample(key, cfg.eval_samples, length)
  return tuple(np.asarray(a, np.float64) for a in (x, y, xq, yq))


_EVAL_PROGRESS: Dict[str, object] = {}


def _eval_progress(cfg, runs):
  """Progress over model evaluations (prompts x context length units)."""
  lengths = {cfg.L}
  if cfg.reduced_model and cfg.num_tasks == 1:
    lengths |= set(_ints(cfg.reduced_lengths))
    lengths |= set(_ints(cfg.estimator_lengths))
  if cfg.length_generalization and cfg.num_tasks == 1:
    lengths |= set(_ints(cfg.eval_lengths))
  total = sum(lengths) * len(runs)
  _EVAL_PROGRESS["p"] = common.Progress(
      total, every=max(1, total // 10), desc="evaluate models",
      unit="context-length units")
  _EVAL_PROGRESS["done"] = 0


def _model_on_prefix(run, params, data, length, chunk):
  x, y, xq, _ = data
  zq, zc = tokens(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32),
                  jnp.asarray(xq, jnp.float32))
  mask = np.zeros(x.shape[:2], bool)
  mask[:, :length] = True
  out = run.predict(params, zq, zc, jnp.asarray(mask), chunk)
  if "p" in _EVAL_PROGRESS:
    _EVAL_PROGRESS["done"] += length
    _EVAL_PROGRESS["p"].update(_EVAL_PROGRESS["done"])
  return out


def baselines_at(cfg, fit, ev, length: int) -> Dict[str, float]:
  """MSE of the reference predictors on prefixes of length `length`."""
  fx, fy, fxq, fyq = (a[:, :length] if a.ndim == 3 else a for a in fit)
  ex, ey, exq, eyq = (a[:, :length] if a.ndim == 3 else a for a in ev)
  fy, fyq, ey, eyq = fy[..., 0], fyq[..., 0], ey[..., 0], eyq[..., 0]
  out = {"ridge": _mse(ridge_predict(ex, ey, exq, cfg.sigma2 * cfg.d), eyq)}
  for name, feat in (("gd", gd_feature), ("debiased_gd", debiased_gd_feature)):
    eta = _fit_scale(feat(fx, fy, fxq), fyq)
    out[name] = _mse(eta * feat(ex, ey, exq), eyq)
    out[name + "_eta"] = eta
  best = None
  for om in np.linspace(0.02, 2.0, cfg.kernel_grid):
    f = kernel_feature(fx, fy, fxq, om)
    mu = _fit_scale(f, fyq)
    err = _mse(mu * f, fyq)
    if best is None or err < best[0]:
      best = (err, om, mu)
  _, om, mu = best
  out["single_head_kernel"] = _mse(mu * kernel_feature(ex, ey, exq, om), eyq)
  out["single_head_kernel_omega"] = float(om)
  return out


def make_runs(cfg, task) -> List[Run]:
  """The config's runs: softmax H in cfg.heads, then each linear variant."""
  runs = [Run(cfg, task, "softmax", h) for h in _ints(cfg.heads)]
  for kind in [k.strip() for k in cfg.linear_variants.split(",") if k]:
    runs += [Run(cfg, task, kind, h) for h in _ints(cfg.linear_heads)]
  return runs


def run_study(cfg, workdir: str) -> dict:
  t0 = time.time()
  # Multi-host: before any jax computation (no-op on a single host).
  sharding.maybe_initialize_distributed()     # idempotent; no-op on one host
  task = Task(cfg)
  d, T = cfg.d, cfg.num_tasks
  heads, lin_heads = _ints(cfg.heads), _ints(cfg.linear_heads)
  runs = make_runs(cfg, task)
  trained = train(cfg, task, runs, workdir)

  # Evaluation data: prompts with the longest context any analysis needs;
  # shorter contexts are prefixes (masked for the models).
  red_L = _ints(cfg.reduced_lengths) if cfg.reduced_model else []
  len_L = _ints(cfg.eval_lengths) if cfg.length_generalization else []
  est_L = (_ints(cfg.estimator_lengths)
           if cfg.reduced_model and cfg.num_tasks == 1 else [])
  lmax = max([cfg.L] + red_L + len_L + est_L)
  ev = _eval_set(cfg, task, 10_001, lmax)
  fit = _eval_set(cfg, task, 10_002, lmax)
  chunk = cfg.eval_chunk
  _eval_progress(cfg, runs)

  res = {"config": cfg.to_dict(), "heads": heads, "linear_heads": lin_heads,
         "linear_variants": cfg.linear_variants,
         "test_mse": {}, "test_mse_linear": {}, "test_mse_linear_norm": {},
         "kq_diag_ratio": {}, "kq_diag_ratio_weighted": {},
         "ov_last_entry_ratio_weighted": {},
         "kq_diag_norm_var": {}, "ov_last_entry_ratio": {}, "ov_zero_sum": {},
         "ov_last_sum": {}, "num_active_heads": {}, "head_metrics": {}}
  preds = {}
  for run in runs:
    p = _model_on_prefix(run, trained[run.name], ev, cfg.L, chunk)
    preds[(run.name, cfg.L)] = p
    mse = float(np.mean(np.sum((p - ev[3]) ** 2, axis=-1)))
    key = str(run.H)
    if run.attention != "softmax":
      res["test_mse_" + run.attention][key] = mse
      continue
    res["test_mse"][key] = mse
    kq, ov = run.merged(trained[run.name])
    summ = kq_ov.summarize_heads(kq, ov, kq_block=slice(0, d),
                                 rel_threshold=cfg.active_threshold)
    # The y-readout of task 1 is the OV row d (token coordinate of y_1).
    summ["ov_last_entry"] = ov[:, d, 0].tolist()
    if T == 1:
      res["kq_diag_ratio"][key] = summ["mean_active_kq_diag_ratio"]
      res["kq_diag_norm_var"][key] = summ["mean_active_kq_diag_norm_var"]
      res["ov_last_entry_ratio"][key] = summ["mean_active_ov_last_entry_ratio"]
      res["ov_zero_sum"][key] = summ["ov_last_zero_sum"]
    else:
      act = np.asarray(summ["active"])
      res["kq_diag_ratio"][key] = summ["mean_active_kq_diag_ratio"]
      res["kq_diag_norm_var"][key] = summ["mean_active_kq_diag_norm_var"]
      # Multi-task: each head's OV should read only the y rows.
      ratio = (np.linalg.norm(ov[:, d:, :], axis=(1, 2)) /
               np.maximum(np.linalg.norm(ov, axis=(1, 2)), 1e-30))
      res["ov_last_entry_ratio"][key] = float(ratio[act].mean())
    res["num_active_heads"][key] = summ["num_active"]
    res["ov_last_sum"][key] = float(
        np.sum(ov[:, d, 0][np.asarray(summ["active"])]))
    w = kq_ov.head_norms(ov)
    w = w / w.sum()
    res["kq_diag_ratio_weighted"][key] = float(
        np.dot(w, summ["kq_diag_ratio"]))
    res["ov_last_entry_ratio_weighted"][key] = float(
        np.dot(w, summ["ov_last_entry_ratio"]))
    res["head_metrics"][key] = summ

  if T == 1:
    base_lengths = sorted(set(red_L + [cfg.L]))
    res["baselines"] = {str(l): baselines_at(cfg, fit, ev, l)
                        for l in base_lengths}
    res["baseline_mse"] = res["baselines"][str(cfg.L)]
  if T == 1 and cfg.reduced_model:
    res["reduced_model"] = _reduced_model(cfg, runs, trained, ev, red_L, preds)
  if T == 1 and cfg.length_generalization:
    res["length_generalization"] = _length_gen(cfg, runs, trained, fit, ev,
                                               len_L, preds)
  if T == 1 and cfg.reduced_model:
    est_L = _ints(cfg.estimator_lengths)
    if est_L:
      res["estimators"] = _estimators(cfg, runs, trained, ev, est_L, preds,
                                      res)
    res["gradient_flow"] = _gradient_flow_study(cfg, runs, workdir)
  if T == 1:
    res["dummy_heads"] = _dummy_heads(cfg, runs, trained, ev, preds, res)
  if T == 1 and cfg.rho > 0:
    res["noniso"] = _noniso(cfg, task, runs, trained, fit, ev)
  if T > 1:
    res["multitask"] = _multitask(cfg, task, runs, trained, ev, preds)
  res["wall_time_s"] = time.time() - t0
  if cfg.figures:
    _figures(cfg, workdir, runs, trained, res)
  return res


def authors_kernel_values(d: int, sigma2: float, L: int):
  """The authors' fixed single-head kernel predictor (plots.ipynb cell 1).

  omega = 1/sqrt(d), mu = sqrt(d) / (1 + (1 + sigma^2) d e / L).
  """
  return 1.0 / math.sqrt(d), math.sqrt(d) / (1.0 + (1.0 + sigma2) * d *
                                             math.e / L)


def _estimators(cfg, runs, trained, ev, lengths, preds, res):
  """The authors' estimator comparison on a length grid (plots.ipynb 1-2).

  MSE on the evaluation prompts (query noise included) at each L of:
  every trained softmax / linear model; the reduced multi-head model
  sum_h mu_h softmax(omega_h X x_q)^T y with each trained H's (omega_h,
  mu_h) and with the authors' fixed omega = 0.13 (+1, -1), mu = 3.45 (+1,
  -1); one-step GD and debiased GD with the authors' step 2 omega mu (their
  GDEst / DGDEst) and with the step fitted by least squares at each L; the
  single-head kernel predictor with the authors' fixed (omega, mu) and with
  the trained H = 1 head; ridge (Bayes-optimal, lambda = sigma^2 d).
  """
  d = cfg.d
  x, y, xq, yq = ev[0], ev[1][..., 0], ev[2], ev[3][..., 0]
  om_a, mu_a = float(cfg.authors_omega), float(cfg.authors_mu)
  out = {"lengths": lengths, "mse": {}, "authors_values": {
      "omega": om_a, "mu": mu_a, "gd_step": 2 * om_a * mu_a}}
  mse = out["mse"]
  add = lambda name, v: mse.setdefault(name, []).append(float(v))
  red = {}
  for run in runs:
    if run.attention == "softmax":
      kq, ov = run.merged(trained[run.name])
      red[run.H] = (kq_ov.diagonal_mean(kq[:, :d, :d]), ov[:, d, 0])
  for l in lengths:
    xl, yl = x[:, :l], y[:, :l]
    for run in runs:
      key = (run.name, l)
      if key not in preds:
        preds[key] = _model_on_prefix(run, trained[run.name], ev, l,
                                      cfg.eval_chunk)
      add(f"trained_{run.name}", _mse(preds[key][:, 0], yq))
    for h, (om, mu) in red.items():
      add(f"reduced_trained_h{h}", _mse(reduced_predict(xl, yl, xq, om, mu),
                                        yq))
    add("reduced_authors", _mse(reduced_predict(
        xl, yl, xq, [om_a, -om_a], [mu_a, -mu_a]), yq))
    gdf, dgdf = gd_feature(xl, yl, xq), debiased_gd_feature(xl, yl, xq)
    add("gd_authors", _mse(2 * om_a * mu_a * gdf, yq))
    add("debiased_gd_authors", _mse(2 * om_a * mu_a * dgdf, yq))
    add("gd_tuned", _mse(_fit_scale(gdf, yq) * gdf, yq))
    add("debiased_gd_tuned", _mse(_fit_scale(dgdf, yq) * dgdf, yq))
    ok, mk = authors_kernel_values(d, cfg.sigma2, l)
    add("kernel_authors", _mse(mk * kernel_feature(xl, yl, xq, ok), yq))
    if 1 in red:
      add("kernel_trained_h1", _mse(reduced_predict(xl, yl, xq, *red[1]), yq))
    add("ridge", _mse(ridge_predict(xl, yl, xq, cfg.sigma2 * d), yq))
  out["note"] = ("*_tuned fit their step on the evaluation prompts "
                 "themselves (an optimistic bound); all others use no "
                 "evaluation data.")
  return out


def reduced_loss(omega, mu, sigma2, L, d):
  """The authors' reduced-model loss (utils/funcs.py loss_function).

  (1 + s2 - 2 mu.omega + mu^T (omega omega^T + (1 + s2)/L exp(d omega
  omega^T)) mu) / 2, with exp elementwise: the large-L approximation of
  the test error of sum_h mu_h softmax(omega_h X x_q)^T y.
  """
  om, mu = np.asarray(omega, np.float64), np.asarray(mu, np.float64)
  a = np.outer(om, om) + (1 + sigma2) / L * np.exp(d * np.outer(om, om))
  return 0.5 * (1 + sigma2 - 2 * mu @ om + mu @ a @ mu)


def reduced_gradients(omega, mu, sigma2, L, d):
  """(d loss / d omega, d loss / d mu) of `reduced_loss` (closed form)."""
  om, mu = np.asarray(omega, np.float64), np.asarray(mu, np.float64)
  e = np.exp(d * np.outer(om, om))
  a = np.outer(om, om) + (1 + sigma2) / L * e
  g_mu = -om + a @ mu
  g_om = -mu + (mu @ om) * mu + d * (1 + sigma2) / L * (e * np.outer(mu, mu)
                                                        ) @ om
  return g_om, g_mu


def reduced_gradient_flow(omega0, mu0, sigma2, L, d, *, t_max=1e5,
                          num_points=400):
  """The reduced model's gradient flow d(omega, mu)/dt = -grad (the ODE the
  authors integrate by Euler steps in utils/funcs.py gradient_flow),
  solved with scipy's LSODA to t_max.

  Returns (omega [K, H], mu [K, H], t [K]) at K log-spaced times from 0.
  """
  from scipy.integrate import solve_ivp
  om0 = np.asarray(omega0, np.float64)
  h = om0.size

  def f(_, v):
    g_om, g_mu = reduced_gradients(v[:h], v[h:], sigma2, L, d)
    return -np.concatenate([g_om, g_mu])

  ts = np.concatenate([[0.0], np.logspace(-2, np.log10(t_max),
                                          num_points - 1)])
  sol = solve_ivp(f, (0.0, t_max), np.concatenate([om0, np.asarray(
      mu0, np.float64)]), method="LSODA", t_eval=ts, rtol=1e-8, atol=1e-10)
  return sol.y[:h].T, sol.y[h:].T, sol.t


def _gradient_flow_study(cfg, runs, workdir):
  """The reduced-model ODE from each trained model's (omega, mu) at init.

  The flow is started at the (omega_h, mu_h) read off the model at step 0
  and compared with the trained trajectory in the (omega, mu) plane (time
  scales differ: Adam steps vs flow time), and its fixed point with the
  trained end point.
  """
  recs = common.MetricsWriter(workdir).read()
  out = {}
  for run in runs:
    if run.attention != "softmax" or not recs:
      continue
    om0 = np.array(recs[0]["omega/" + run.name])
    mu0 = np.array(recs[0]["mu/" + run.name])
    om, mu, t = reduced_gradient_flow(om0, mu0, cfg.sigma2, cfg.L, cfg.d)
    out[str(run.H)] = {
        "omega": om.tolist(), "mu": mu.tolist(),
        "t": t.tolist(), "omega_end": om[-1].tolist(),
        "mu_end": mu[-1].tolist(),
        "loss_end": float(reduced_loss(om[-1], mu[-1], cfg.sigma2, cfg.L,
                                       cfg.d)),
        "omega_trained": recs[-1]["omega/" + run.name],
        "mu_trained": recs[-1]["mu/" + run.name],
        "loss_trained_params": float(reduced_loss(
            recs[-1]["omega/" + run.name], recs[-1]["mu/" + run.name],
            cfg.sigma2, cfg.L, cfg.d))}
  return out


def _dummy_heads(cfg, runs, trained, ev, preds, res):
  """Does a model with H > 2 heads reduce to the 2-head solution?

  Per softmax model: the active heads (rule: ||OV_h|| >= active_threshold x
  the largest ||OV_h|| of that model), their sign groups (sign of omega_h),
  per group the spread of omega_h and the sum of mu_h (a group of heads
  with one omega acts as one head with the summed mu), and the relative
  gap E(f_H - f_2)^2 / E y^2 between this model's predictions and the
  2-head model's at the training L. The paper's claim, in its strict form
  ('dummy heads'): exactly 2 active heads for H > 2; in its functional
  form: the model computes the 2-head function (small gap).
  """
  d = cfg.d
  yq = ev[3][..., 0]
  two = next((r for r in runs if r.attention == "softmax" and r.H == 2), None)
  out = {"rule": f"active: ||OV_h|| >= {cfg.active_threshold} x max_h "
                 "||OV_h|| (Frobenius norm of OV_h = V_h^T O_h^T)"}
  for run in runs:
    if run.attention != "softmax":
      continue
    kq, ov = run.merged(trained[run.name])
    om = kq_ov.diagonal_mean(kq[:, :d, :d])
    mu = ov[:, d, 0]
    norms = kq_ov.head_norms(ov)
    act = kq_ov.active_heads(ov, cfg.active_threshold)
    groups = {}
    for sign, name in ((1, "positive"), (-1, "negative")):
      sel = act & (np.sign(om) == sign)
      groups[name] = {
          "heads": np.nonzero(sel)[0].tolist(),
          "omega": om[sel].tolist(),
          "omega_spread": float(np.ptp(om[sel])) if sel.any() else None,
          "mu_sum": float(mu[sel].sum()) if sel.any() else None}
    r = {"num_active": int(act.sum()), "active": act.tolist(),
         "ov_norm_rel": (norms / norms.max()).tolist(),
         "omega": om.tolist(), "mu": mu.tolist(), "groups": groups}
    if two is not None:
      p2 = preds[(two.name, cfg.L)][:, 0]
      r["rel_gap_to_h2"] = _mse(preds[(run.name, cfg.L)][:, 0], p2) / float(
          np.mean(yq ** 2))
    if run.H > 2:
      r["strict_two_active"] = bool(act.sum() == 2)
    out[str(run.H)] = r
  return out


def _reduced_model(cfg, runs, trained, ev, lengths, preds):
  d = cfg.d
  out = {}
  x, y, xq, yq = ev[0], ev[1][..., 0], ev[2], ev[3][..., 0]
  for run in runs:
    if run.attention != "softmax":
      continue
    kq, ov = run.merged(trained[run.name])
    omega = kq_ov.diagonal_mean(kq[:, :d, :d])
    mu = ov[:, d, 0]
    r = {"omega": omega.tolist(), "mu": mu.tolist(),
         "eta_heads": float(np.dot(mu, omega)), "mu_sum": float(mu.sum()),
         "mse_model": {},
         "mse_reduced": {}, "mse_dgd_from_heads": {}, "rel_gap_reduced": {},
         "rel_gap_dgd": {}}
    for l in lengths:
      key = (run.name, l)
      if key not in preds:
        preds[key] = _model_on_prefix(run, trained[run.name], ev, l,
                                      cfg.eval_chunk)
      pm = preds[key][:, 0]
      xl, yl = x[:, :l], y[:, :l]
      pr = reduced_predict(xl, yl, xq, omega, mu)
      # Linearization of the reduced model: (sum mu) ybar + (sum mu omega) DGD
      pd = (mu.sum() * yl.mean(axis=1) +
            float(np.dot(mu, omega)) * debiased_gd_feature(xl, yl, xq))
      ey2 = float(np.mean(yq ** 2))
      r["mse_model"][str(l)] = _mse(pm, yq)
      r["mse_reduced"][str(l)] = _mse(pr, yq)
      r["mse_dgd_from_heads"][str(l)] = _mse(pd, yq)
      r["rel_gap_reduced"][str(l)] = _mse(pm, pr) / ey2
      r["rel_gap_dgd"][str(l)] = _mse(pm, pd) / ey2
    out[str(run.H)] = r
  return out


def _length_gen(cfg, runs, trained, fit, ev, lengths, preds):
  x, y, xq, yq = ev[0], ev[1][..., 0], ev[2], ev[3][..., 0]
  fx, fy, fxq, fyq = fit[0], fit[1][..., 0], fit[2], fit[3][..., 0]
  out = {"lengths": lengths, "mse": {}}
  for run in runs:
    vals = []
    for l in lengths:
      key = (run.name, l)
      if key not in preds:
        preds[key] = _model_on_prefix(run, trained[run.name], ev, l,
                                      cfg.eval_chunk)
      vals.append(_mse(preds[key][:, 0], yq))
    out["mse"][run.name] = vals
  eta_fixed = _fit_scale(debiased_gd_feature(fx[:, :cfg.L], fy[:, :cfg.L],
                                             fxq), fyq)
  ridge, tuned, fixed = [], [], []
  for l in lengths:
    xl, yl = x[:, :l], y[:, :l]
    ridge.append(_mse(ridge_predict(xl, yl, xq, cfg.sigma2 * cfg.d), yq))
    eta = _fit_scale(debiased_gd_feature(fx[:, :l], fy[:, :l], fxq), fyq)
    f = debiased_gd_feature(xl, yl, xq)
    tuned.append(_mse(eta * f, yq))
    fixed.append(_mse(eta_fixed * f, yq))
  out["mse"]["ridge"] = ridge
  out["mse"]["debiased_gd_tuned"] = tuned
  out["mse"]["debiased_gd_fixed"] = fixed
  return out


def _noniso(cfg, task, runs, trained, fit, ev):
  d, L = cfg.d, cfg.L
  x, y, xq, yq = ev[0][:, :L], ev[1][:, :L, 0], ev[2], ev[3][..., 0]
  fx, fy, fxq, fyq = fit[0][:, :L], fit[1][:, :L, 0], fit[2], fit[3][..., 0]

  def feats(x_, y_, xq_):   # [B, d, d]: (1/L) sum_l (y_l - ybar) x_l x_q^T
    yc = y_ - y_.mean(axis=1, keepdims=True)
    return np.einsum("bl,bld,be->bde", yc, x_, xq_) / x_.shape[1]

  ff = feats(fx, fy, fxq).reshape(fx.shape[0], -1)
  fb = np.concatenate([ff, fy.mean(axis=1)[:, None]], axis=1)
  coef = np.linalg.lstsq(fb, fyq, rcond=None)[0]
  gamma_star = coef[:-1].reshape(d, d)
  fe = feats(x, y, xq)
  mse_fit = _mse(np.einsum("bde,de->b", fe, gamma_star) +
                 coef[-1] * y.mean(axis=1), yq)
  sig_inv = np.linalg.inv(task.sigma)
  out = {"sigma": task.sigma.tolist(), "gamma_fitted": gamma_star.tolist(),
         "mse_gamma_fitted": mse_fit,
         "cos_fitted_sigma_inv": float(kq_ov.matrix_cosine(gamma_star,
                                                          sig_inv)),
         "cos_fitted_identity": float(kq_ov.matrix_cosine(gamma_star,
                                                         np.eye(d)))}
  for run in runs:
    if run.attention != "softmax":
      continue
    kq, ov = run.merged(trained[run.name])
    mu = ov[:, d, 0]
    gamma = np.einsum("h,hde->de", mu, kq[:, :d, :d])
    out[str(run.H)] = {
        "gamma_heads": gamma.tolist(),
        "cos_gamma_sigma_inv": float(kq_ov.matrix_cosine(gamma, sig_inv)),
        "cos_gamma_identity": float(kq_ov.matrix_cosine(gamma, np.eye(d))),
        "cos_gamma_fitted": float(kq_ov.matrix_cosine(gamma, gamma_star)),
        "mse_gamma_heads": _mse(np.einsum("bde,de->b", fe, gamma) +
                                mu.sum() * y.mean(axis=1), yq),
    }
  return out


def authors_multitask_label(H: int, num_tasks: int) -> str:
  """The authors' regime for H heads and N tasks (icl_linear_multitask.ipynb
  cell 0 TL;DR, cells 25/31 headings): 2 < H < 2N superposition, H >= 2N
  one task per head ('split-up', their H = 4 = 2N run); H <= 2 has no label.
  """
  if H <= 2:
    return "n/a"
  return "superposition" if H < 2 * num_tasks else "one-task-per-head"


def _multitask(cfg, task, runs, trained, ev, preds):
  d, T = cfg.d, cfg.num_tasks
  out = {"supports": task.supports,
         "rule": "per active head: share = |OV[y1, out1]| / (|OV[y1, out1]| "
                 "+ |OV[y2, out2]|); superposition_index = mean over active "
                 "heads of 1 - |2 share - 1|; regime 'superposition' if > 0.5"}
  for run in runs:
    if run.attention != "softmax":
      continue
    kq, ov = run.merged(trained[run.name])
    act = kq_ov.active_heads(ov, cfg.active_threshold)
    readout = np.stack([np.abs(ov[:, d + t, t]) for t in range(T)], axis=1)
    share = readout[:, 0] / np.maximum(readout.sum(axis=1), 1e-30)
    sup_idx = 1.0 - np.abs(2.0 * share - 1.0)
    sp = float(sup_idx[act].mean())
    p = preds[(run.name, cfg.L)]
    out[str(run.H)] = {
        "task_share": share.tolist(), "active": act.tolist(),
        "superposition_index": sp,
        "regime": "superposition" if sp > 0.5 else "one-task-per-head",
        "authors_label": authors_multitask_label(run.H, T),
        "test_mse_per_task": np.mean((p - ev[3]) ** 2, axis=0).tolist(),
        "omega_per_task_support": [
            [float(np.mean(np.diagonal(kq[h, :d, :d])[g]))
             for g in task.supports] for h in range(run.H)],
    }
  return out


def _token_labels(cfg):
  return ([f"x{i + 1}" for i in range(cfg.d)] +
          (["y"] if cfg.num_tasks == 1 else
           [f"y{t + 1}" for t in range(cfg.num_tasks)]))


def _heatmap_row(fig, axes, mats, vmax, labels, titles, *, cbar_label,
                 xlabel, ylabel):
  """Heatmaps on one colour scale [-vmax, vmax] with one colorbar."""
  im = None
  for ax, m, t in zip(axes, mats, titles):
    im = ax.imshow(m, cmap="RdBu_r", vmin=-vmax, vmax=vmax,
                   aspect="equal" if m.shape[1] > 1 else "auto")
    ax.set_title(t, fontsize=8)
    ax.set_yticks(range(m.shape[0]))
    ax.set_yticklabels(labels[:m.shape[0]], fontsize=6)
    if m.shape[1] == len(labels):
      ax.set_xticks(range(m.shape[1]))
      ax.set_xticklabels(labels, fontsize=6)
    else:
      ax.set_xticks(range(m.shape[1]))
      ax.set_xticklabels([f"out {i + 1}" for i in range(m.shape[1])],
                         fontsize=6)
    ax.set_xlabel(xlabel, fontsize=7)
  axes[0].set_ylabel(ylabel, fontsize=7)
  cb = fig.colorbar(im, ax=list(axes), shrink=0.8)
  cb.set_label(cbar_label, fontsize=7)


def _figures(cfg, workdir, runs, trained, res):
  plt = common.setup_matplotlib()
  from matplotlib.ticker import EngFormatter
  recs = common.MetricsWriter(workdir).read()
  d = cfg.d
  labels = _token_labels(cfg)
  soft = [r for r in runs if r.attention == "softmax"]
  # Loss curves.
  fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
  for run in runs:
    k = "train_loss/" + run.name
    rr = [r for r in recs if k in r]
    ax.plot([r["step"] for r in rr], [r[k] for r in rr], label=run.name)
  if "baseline_mse" in res:
    ax.axhline(res["baseline_mse"]["ridge"], color="k", ls="--",
               label="ridge (Bayes-optimal)")
  ax.set_yscale("log")
  ax.set_xlabel("training step")
  ax.set_ylabel(f"train MSE (mean over {cfg.log_every} steps)")
  ax.set_title(f"Training loss (d={d}, L={cfg.L}, batch {cfg.batch_size})")
  ax.legend(fontsize=7)
  common.save_figure(fig, workdir, "loss_curves")
  # KQ / OV heatmaps per H: one colour scale for all heads' KQ, one for OV.
  for run in soft:
    kq, ov = run.merged(trained[run.name])
    H = run.H
    fig, axes = plt.subplots(2, H, figsize=(2.3 * H + 1.2, 5.2),
                             squeeze=False, layout="constrained")
    vk = max(float(np.abs(kq).max()), 1e-12)
    _heatmap_row(fig, axes[0], list(kq), vk, labels,
                 [f"head {h + 1}: KQ" for h in range(H)],
                 cbar_label="KQ entry (scale incl.)",
                 xlabel="query coordinate", ylabel="context coordinate")
    vo = max(float(np.abs(ov).max()), 1e-12)
    _heatmap_row(fig, axes[1], list(ov), vo, labels,
                 [f"head {h + 1}: OV" for h in range(H)],
                 cbar_label="OV entry", xlabel="output",
                 ylabel="context coordinate")
    fig.suptitle(f"Softmax attention, H={H}: merged KQ_h = K_h^T Q_h/sqrt(D)"
                 f" and OV_h = V_h^T O_h^T at step {cfg.steps}", fontsize=9)
    common.save_figure(fig, workdir, f"kq_ov_heads_h{H}")
  # KQ evolution (the authors' evolution figure): snapshots x heads.
  snaps = [r for r in recs if any(k.startswith("kq/") for k in r)]
  for run in soft:
    rows = [r for r in snaps if "kq/" + run.name in r]
    if len(rows) < 2:
      continue
    H = run.H
    mats = [np.array(r["kq/" + run.name]) for r in rows]
    vk = max(float(max(np.abs(m).max() for m in mats)), 1e-12)
    fig, axes = plt.subplots(H, len(rows), figsize=(1.9 * len(rows) + 1.2,
                                                    1.9 * H + 0.8),
                             squeeze=False, layout="constrained")
    im = None
    for h in range(H):
      for j, (r, m) in enumerate(zip(rows, mats)):
        ax = axes[h, j]
        im = ax.imshow(m[h], cmap="RdBu_r", vmin=-vk, vmax=vk)
        ax.set_xticks([])
        ax.set_yticks([])
        if h == 0:
          ax.set_title(f"step {r['step']}", fontsize=8)
        if h == H - 1:
          ax.set_xlabel("query coord.", fontsize=7)
        if j == 0:
          ax.set_ylabel(f"head {h + 1}\ncontext coord.", fontsize=7)
    cb = fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8)
    cb.set_label("KQ entry", fontsize=7)
    fig.suptitle(f"Evolution of KQ_h during training, H={H} (one colour "
                 "scale)", fontsize=9)
    common.save_figure(fig, workdir, f"kq_evolution_h{H}")
  # Trajectories of omega_h (mean KQ_x diagonal) and mu_h (OV y-entry).
  if soft and recs:
    fig, axes = plt.subplots(2, len(soft), figsize=(3.4 * len(soft), 5.6),
                             squeeze=False, layout="constrained")
    steps = [r["step"] for r in recs]
    for i, run in enumerate(soft):
      om = np.array([r["omega/" + run.name] for r in recs])
      mu = np.array([r["mu/" + run.name] for r in recs])
      for h in range(run.H):
        axes[0, i].plot(steps, om[:, h], lw=1, label=f"head {h + 1}")
        axes[1, i].plot(steps, mu[:, h], lw=1, label=f"head {h + 1}")
      axes[0, i].set_title(f"H={run.H}: omega_h", fontsize=9)
      axes[1, i].set_title(f"H={run.H}: mu_h", fontsize=9)
      axes[0, i].set_ylabel("omega_h = mean diag of KQ_x", fontsize=7)
      axes[1, i].set_ylabel("mu_h = OV_h[y]", fontsize=7)
      for a in axes[:, i]:
        a.set_xlabel("training step", fontsize=7)
        a.axhline(0, color="gray", lw=0.5)
        # "100k" rather than "100000": six-digit ticks overlapped here.
        a.xaxis.set_major_formatter(EngFormatter(sep=""))
      if run.H <= 8:
        axes[0, i].legend(fontsize=5, ncol=2)
    fig.suptitle("Per-head reduced-model parameters during training",
                 fontsize=10)
    common.save_figure(fig, workdir, "trajectories")
  # Reduced-model gradient flow vs trained trajectories, (omega, mu) plane.
  gf = res.get("gradient_flow", {})
  if gf and recs:
    fig, axes = plt.subplots(1, len(gf), figsize=(3.6 * len(gf), 3.6),
                             squeeze=False, layout="constrained")
    for i, (h, g) in enumerate(sorted(gf.items(), key=lambda kv: int(kv[0]))):
      ax = axes[0, i]
      name = f"softmax_h{h}"
      om = np.array([r["omega/" + name] for r in recs])
      mu = np.array([r["mu/" + name] for r in recs])
      gom, gmu = np.array(g["omega"]), np.array(g["mu"])
      for k in range(om.shape[1]):
        ax.plot(om[:, k], mu[:, k], ".", ms=2, color=f"C{k}",
                label="trained (Adam)" if k == 0 else None)
        ax.plot(gom[:, k], gmu[:, k], "-", lw=1, color=f"C{k}",
                label="gradient flow (ODE)" if k == 0 else None)
        ax.plot(gom[-1, k], gmu[-1, k], "kx", ms=6)
      ax.set_xlabel("omega_h")
      ax.set_ylabel("mu_h")
      ax.set_title(f"H={h}: (omega_h, mu_h) paths", fontsize=9)
      ax.legend(fontsize=6)
    fig.suptitle("Trained paths vs the reduced model's gradient flow from "
                 "the same initial point (x: ODE end)", fontsize=9)
    common.save_figure(fig, workdir, "gradient_flow")
  # Predictor comparison at the reduced lengths (bars).
  if "baselines" in res:
    lengths = sorted(res["baselines"], key=int)
    names = ["ridge", "debiased_gd", "gd", "single_head_kernel"]
    fig, ax = plt.subplots(figsize=(7.5, 4), layout="constrained")
    width = 0.8 / (len(names) + len(soft) + 1)
    xs = np.arange(len(lengths))
    k = 0
    for n in names:
      ax.bar(xs + k * width, [res["baselines"][l][n] for l in lengths], width,
             label=n + (" (tuned)" if n != "ridge" else ""))
      k += 1
    rm = res.get("reduced_model", {})
    for run in soft:
      vals = [rm.get(str(run.H), {}).get("mse_model", {}).get(l, np.nan)
              for l in lengths]
      ax.bar(xs + k * width, vals, width, label=f"trained H={run.H}")
      k += 1
    if rm:
      h = "2" if "2" in rm else str(max(int(k_) for k_ in rm))
      ax.bar(xs + k * width, [rm[h]["mse_reduced"].get(l, np.nan)
                              for l in lengths], width,
             label=f"reduced model (H={h})")
    ax.set_xticks(xs + 0.4)
    ax.set_xticklabels([f"L={l}" for l in lengths])
    ax.set_xlabel("context length")
    ax.set_ylabel("test MSE")
    ax.set_title(f"Predictors vs trained models (trained at L={cfg.L})")
    ax.legend(fontsize=6, ncol=2)
    common.save_figure(fig, workdir, "predictors")
  # The authors' estimator comparison on the fine length grid.
  if "estimators" in res:
    est = res["estimators"]
    fig, ax = plt.subplots(figsize=(7, 4.6), layout="constrained")
    show = [n for n in ("reduced_authors", "reduced_trained_h2",
                        "debiased_gd_authors", "gd_authors", "kernel_authors",
                        "kernel_trained_h1", "ridge", "trained_softmax_h1",
                        "trained_softmax_h2", "trained_softmax_h4",
                        "trained_softmax_h8") if n in est["mse"]]
    for i, n in enumerate(show):
      ls = "-" if n.startswith("trained") else ":"
      ax.plot(est["lengths"], est["mse"][n], ls, marker="o", ms=3,
              label=n, color=f"C{i % 10}")
    ax.axvline(cfg.L, color="gray", lw=0.5)
    ax.set_xlabel("prompt length L")
    ax.set_ylabel("test MSE (query noise included)")
    ax.set_title("Estimators vs trained models (authors' comparison)")
    ax.legend(fontsize=6, ncol=2)
    common.save_figure(fig, workdir, "estimators")
  if "length_generalization" in res:
    lg = res["length_generalization"]
    fig, ax = plt.subplots(figsize=(6.5, 4), layout="constrained")
    for name, vals in lg["mse"].items():
      ls = "--" if name in ("ridge", "debiased_gd_tuned",
                            "debiased_gd_fixed") else "-"
      vals = [v if v < 1e3 else np.nan for v in vals]
      ax.plot(lg["lengths"], vals, ls, marker="o", ms=3, label=name)
    ax.axvline(cfg.L, color="gray", lw=0.5)
    ax.set_yscale("log")
    ax.set_xlabel("context length L (trained at %d)" % cfg.L)
    ax.set_ylabel("test MSE")
    ax.set_title("Length generalization: softmax vs linear attention")
    ax.legend(fontsize=7)
    common.save_figure(fig, workdir, "length_generalization")


def main(argv):
  del argv
  res, path = common.run_study_main(run_study, stopped=(Stopped,))
  if res is None:
    return
  msg = " ".join(f"H={h}:{v:.4f}" for h, v in res["test_mse"].items())
  print(f"test_mse {msg}; wrote {path} ({res['wall_time_s']:.0f}s)",
        flush=True)


if __name__ == "__main__":
  common.define_study_flags("icl_regression.py")
  app.run(main)
