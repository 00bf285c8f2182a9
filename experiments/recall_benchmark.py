r"""Associative recall across sequence mechanisms (Zoology's MQAR).

Multi-query associative recall (Arora et al. 2023, "Zoology: Measuring and
improving recall in efficient language models", Sec. 3): a sequence starts
with D key-value pairs `k_1 v_1 ... k_D v_D` (distinct keys from
[1, vocab/2), values from [vocab/2, vocab)); the rest holds every key once
more, at random positions and in random order, between random filler
tokens. At a repeated key the model must output its value. Accuracy is the
fraction of those query positions predicted exactly (chance ~ 2/vocab).
Data are generated on the fly inside the jitted training loop
(`mqar_batch`), fresh every step; `assemble_mqar` builds one example from
its parts (tested against a hand-built case). Zoology places queries with
power-law gaps; here the positions are uniform over the query region.

Model (as Zoology's two-layer MQAR models): token + learned position
embedding, `num_layers` pre-LayerNorm blocks [causal sequence mixer, GELU
MLP of 2 * width], final LayerNorm, linear readout. The mixer is one of
MECHANISMS (attnjax layers, causal, heads = width // head_dim):

  softmax          MultiHeadAttention (dot_product_attention)
  linear           LinearAttention (elu + 1 features)
  based            BasedAttention (Taylor features + exact window `window`;
                   heads of `based_head_dim`, Zoology's feature_dim 8)
  sliding_window   SlidingWindowAttention(window)
  performer        PerformerAttention(num_features)
  mswa             MSWAAttention(base_window=window, layer i of num_layers)
  lightning        LightningAttention (RetNet decays; decayed linear)
  power            PowerAttention(block 4)
  routing_transformer  RoutingTransformerAttention (k-means clusters; its
                   centroids follow the paper's online k-means: in training
                   the layer's own `kmeans_update` step (exponential moving
                   average of the assigned queries and keys) runs at every
                   step, through the sweep's `train_attributes`)

Sweep: one training cell per (mechanism, width, sequence length), Adam with
warm-up and cosine decay, through experiments.sweep.train_cells (orbax
checkpoints every `ckpt_every` steps, finished cells skipped on re-runs,
per-cell progress with rate and ETA, same seed -> same numbers).

Outputs in --workdir: results.json (accuracy[mechanism][width][T], the
table of cells, chance level), accuracy_vs_width.png (one panel per T, the
Zoology figure's layout), cells/*.json, metrics.jsonl.

Run:
  python -m experiments.recall_benchmark --workdir=runs/mqar \
      --config=experiments/configs/recall_benchmark.py:default
"""

from __future__ import annotations

import functools
import json
import resource
import time
from typing import Any, Dict

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

import attnjax
from attnjax import sequence as sq
from experiments import common, sharding, sweep
from experiments.sweep import Cell, count_params, ints, train_cells


# -- data ----------------------------------------------------------------------

def assemble_mqar(keys, values, query_order, query_pos, filler, seq_len):
  """One MQAR example from its parts (NumPy or traced, no batch dim).

  keys, values: [D] ints; query_order: permutation of range(D) (the order
  keys are queried in); query_pos: [D] distinct positions in [2D, seq_len)
  (query j sits at query_pos[j]); filler: [seq_len] tokens used where
  nothing else is. Returns (tokens [seq_len], targets [seq_len]) with
  targets = the value at each query position, -1 elsewhere.
  """
  d = keys.shape[0]
  kv = jnp.stack([keys, values], axis=1).reshape(2 * d)
  tokens = jnp.asarray(filler).at[:2 * d].set(kv)
  tokens = tokens.at[query_pos].set(keys[query_order])
  targets = jnp.full((seq_len,), -1, jnp.int32).at[query_pos].set(
      values[query_order])
  return tokens.astype(jnp.int32), targets


def mqar_example(key, seq_len: int, num_pairs: int, vocab: int):
  half = vocab // 2
  kk, kv, ko, kp, kf = jax.random.split(key, 5)
  keys = 1 + jax.random.permutation(kk, half - 1)[:num_pairs]
  values = jax.random.randint(kv, (num_pairs,), half, vocab)
  order = jax.random.permutation(ko, num_pairs)
  pos = 2 * num_pairs + jax.random.permutation(
      kp, seq_len - 2 * num_pairs)[:num_pairs]
  filler = jax.random.randint(kf, (seq_len,), 1, vocab)
  return assemble_mqar(keys, values, order, pos, filler, seq_len)


def mqar_batch(key, batch: int, seq_len: int, num_pairs: int, vocab: int):
  """(tokens, targets) [batch, seq_len] int32 (targets -1 = not scored)."""
  check_sizes(seq_len, num_pairs, vocab)
  return jax.vmap(lambda k: mqar_example(k, seq_len, num_pairs, vocab))(
      jax.random.split(key, batch))


def check_sizes(seq_len, num_pairs, vocab):
  if num_pairs < 1 or 3 * num_pairs > seq_len:
    raise ValueError(f"MQAR needs 1 <= num_pairs and 3 * num_pairs <= seq_len "
                     f"(pairs, then as many queries); got num_pairs="
                     f"{num_pairs}, seq_len={seq_len}.")
  if vocab // 2 - 1 < num_pairs:
    raise ValueError(f"vocab={vocab} gives {vocab // 2 - 1} distinct keys, "
                     f"fewer than num_pairs={num_pairs}.")


# -- model ---------------------------------------------------------------------

def make_mixer(name: str, width: int, head_dim: int, layer: int,
               num_layers: int, cfg, rngs: nnx.Rngs):
  heads = max(1, width // head_dim)
  kw = dict(head_dim=head_dim, rngs=rngs)
  w = int(cfg.window)
  if name == "softmax":
    return attnjax.MultiHeadAttention(heads, width, **kw)
  if name == "linear":
    return sq.LinearAttention(heads, width, **kw)
  if name == "based":
    # Zoology's Based projects q, k to feature_dim 8 (1 + 8 + 64 = 73 Taylor
    # features) with values of full width: here heads of `based_head_dim`
    # give the same recurrent state, 73 x width.
    bh = min(int(cfg.based_head_dim), width)
    return sq.BasedAttention(max(1, width // bh), width, window_size=w,
                             head_dim=bh, rngs=rngs)
  if name == "sliding_window":
    return sq.SlidingWindowAttention(heads, width, window_size=w, **kw)
  if name == "performer":
    return sq.PerformerAttention(heads, width,
                                 num_features=int(cfg.num_features), **kw)
  if name == "mswa":
    return sq.MSWAAttention(heads, width, base_window=w, layer=layer,
                            num_layers=num_layers, **kw)
  if name == "lightning":
    return sq.LightningAttention(heads, width, **kw)
  if name == "power":
    return sq.PowerAttention(heads, width, block_size=4, **kw)
  if name == "routing_transformer":
    return sq.RoutingTransformerAttention(heads, width, num_clusters=4, **kw)
  raise ValueError(f"unknown mechanism {name!r}; choose from "
                   f"{', '.join(MECHANISMS)}.")


MECHANISMS = ("softmax", "linear", "based", "sliding_window", "performer",
              "mswa", "lightning", "power", "routing_transformer")


class Block(nnx.Module):

  def __init__(self, mixer, width: int, rngs: nnx.Rngs):
    self.norm1 = nnx.LayerNorm(width, rngs=rngs)
    self.mixer = mixer
    self.norm2 = nnx.LayerNorm(width, rngs=rngs)
    self.up = nnx.Linear(width, 2 * width, rngs=rngs)
    self.down = nnx.Linear(2 * width, width, rngs=rngs)

  def __call__(self, x):
    x = x + self.mixer(self.norm1(x), is_causal=True)
    return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))


class RecallModel(nnx.Module):
  """Embedding + position, `num_layers` [mixer, MLP] blocks, readout."""

  def __init__(self, mechanism: str, *, vocab: int, seq_len: int, width: int,
               num_layers: int, head_dim: int, cfg, rngs: nnx.Rngs):
    self.embed = nnx.Embed(vocab, width, rngs=rngs)
    # Same scale as the token embedding (nnx.Embed: std 1/sqrt(width)); at
    # std 0.02 the position signal the first layer's previous-token head
    # needs was ~9x weaker than the tokens and softmax stayed on the
    # guess-a-value plateau for most of the CPU default's steps.
    self.pos = nnx.Param(jax.random.normal(rngs.params(), (seq_len, width))
                         / np.sqrt(width))
    self.blocks = nnx.List([
        Block(make_mixer(mechanism, width, head_dim, i, num_layers, cfg, rngs),
              width, rngs) for i in range(num_layers)])
    self.norm = nnx.LayerNorm(width, rngs=rngs)
    self.head = nnx.Linear(width, vocab, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens) + self.pos[:tokens.shape[-1]]
    for b in self.blocks:
      x = b(x)
    return self.head(self.norm(x))


def recall_loss(model, batch):
  tokens, targets = batch
  logits = model(tokens).astype(jnp.float32)
  scored = targets >= 0
  lp = jax.nn.log_softmax(logits)
  nll = -jnp.take_along_axis(lp, jnp.maximum(targets, 0)[..., None], -1)[..., 0]
  return jnp.sum(jnp.where(scored, nll, 0.0)) / jnp.maximum(jnp.sum(scored), 1)


def recall_accuracy(model, tokens, targets, batch: int = 128) -> float:
  return recall_eval(model, tokens, targets, batch)["accuracy"]


def recall_eval(model, tokens, targets, batch: int = 128) -> Dict[str, float]:
  """Accuracy and mean loss over the scored positions, one jitted forward
  per `batch` examples (the model is an argument, not a constant)."""

  @nnx.jit
  def fwd(m, x, y):
    logits = m(x).astype(jnp.float32)
    scored = y >= 0
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits),
                               jnp.maximum(y, 0)[..., None], -1)[..., 0]
    return (jnp.sum((jnp.argmax(logits, -1) == y) & scored),
            jnp.sum(jnp.where(scored, nll, 0.0)), jnp.sum(scored))

  hits = total = 0
  nll = 0.0
  for i in range(0, tokens.shape[0], batch):
    h, l, n = fwd(model, tokens[i:i + batch], targets[i:i + batch])
    hits, nll, total = hits + int(h), nll + float(l), total + int(n)
  return {"accuracy": hits / max(total, 1), "eval_loss": nll / max(total, 1)}


# -- study ---------------------------------------------------------------------

def cell_name(mech, width, seq_len):
  return f"{mech}_d{width}_T{seq_len}"


def make_cells(cfg):
  cells = []
  vocab = int(cfg.vocab)

  @functools.lru_cache(maxsize=None)
  def eval_set(t, pairs):
    # Drawn when a cell is first evaluated (a resumed sweep whose cells of
    # this length are finished never draws it); jitted: one compile instead
    # of one per operation.
    eval_key = jax.random.fold_in(jax.random.key(cfg.seed + 1), t)
    return jax.jit(mqar_batch, static_argnums=(1, 2, 3, 4))(
        eval_key, int(cfg.eval_examples), t, pairs, vocab)

  for t in ints(cfg.seq_lens):
    pairs = max(1, t // int(cfg.pairs_per_len))
    check_sizes(t, pairs, vocab)
    for width in ints(cfg.widths):
      for mech in cfg.mechanisms:
        seed = int(cfg.seed) * 1_000_003 + t * 1009 + width * 31 + \
            MECHANISMS.index(mech)

        def mk(mech=mech, t=t, width=width, seed=seed):
          return RecallModel(mech, vocab=vocab, seq_len=t, width=width,
                             num_layers=int(cfg.num_layers),
                             head_dim=min(int(cfg.head_dim), width), cfg=cfg,
                             rngs=nnx.Rngs(seed))

        def batch_fn(key, t=t, pairs=pairs):
          return mqar_batch(key, int(cfg.batch_size), t, pairs, vocab)

        def eval_fn(model, t=t, pairs=pairs):
          return recall_eval(model, *eval_set(t, pairs))

        cells.append(Cell(
            name=cell_name(mech, width, t), make_model=mk,
            loss_fn=recall_loss, batch_fn=batch_fn, eval_fn=eval_fn,
            steps=int(cfg.steps), lr=float(cfg.lr), seed=seed,
            warmup=int(cfg.warmup),
            # The Routing Transformer's online k-means (centroid EMA) runs
            # in training; other mixers have no state to update.
            train_attributes=({"update_centroids": True}
                              if mech == "routing_transformer" else {}),
            info={"mechanism": mech, "width": width, "seq_len": t,
                  "num_pairs": pairs, "params": count_params(mk())}))
  return cells


def _cpu_seconds() -> float:
  """User + system CPU seconds of this process (all its threads)."""
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def run_study(cfg, workdir: str) -> Dict[str, Any]:
  t0, c0 = time.time(), _cpu_seconds()
  for m in cfg.mechanisms:
    if m not in MECHANISMS:
      raise ValueError(f"config.mechanisms: unknown {m!r}; choose from "
                       f"{', '.join(MECHANISMS)}.")
  mesh = sweep.make_mesh(cfg.mesh, {"config.batch_size": cfg.batch_size})
  cells = make_cells(cfg)
  res = train_cells(workdir, cells, chunk=int(cfg.chunk),
                    ckpt_every=int(cfg.ckpt_every),
                    stop_after_steps=int(cfg.stop_after_steps),
                    desc="mqar", mesh=mesh)
  acc: Dict[str, Dict[str, Dict[str, float]]] = {}
  table = []
  for c in cells:
    r = res[c.name]
    acc.setdefault(r["mechanism"], {}).setdefault(
        f"d={r['width']}", {})[f"T={r['seq_len']}"] = r["accuracy"]
    table.append({k: r[k] for k in ("mechanism", "width", "seq_len",
                                    "num_pairs", "params", "accuracy",
                                    "eval_loss", "train_loss_final")})
  out = {"accuracy": acc, "table": table,
         "chance": 2.0 / int(cfg.vocab),
         "seq_lens": ints(cfg.seq_lens), "widths": ints(cfg.widths),
         "mechanisms": list(cfg.mechanisms),
         "wall_time_s": time.time() - t0,
         # This process only (a resumed sweep's earlier runs not included).
         "cpu_time_s": _cpu_seconds() - c0}
  make_figures(cfg, workdir, out)
  return out


def make_figures(cfg, workdir, results):
  plt = common.setup_matplotlib()
  lens = results["seq_lens"]
  fig, axes = plt.subplots(1, len(lens), figsize=(4.2 * len(lens), 3.6),
                           squeeze=False)
  for i, (ax, t) in enumerate(zip(axes[0], lens)):
    for j, m in enumerate(results["mechanisms"]):
      ys = [results["accuracy"][m][f"d={w}"][f"T={t}"]
            for w in results["widths"]]
      ax.plot(results["widths"], ys, marker="os^vD<>ph"[j % 9], label=m)
    ax.axhline(results["chance"], color="k", ls=":", lw=1, label="chance")
    # The loss plateau every model passes through: the answer is one of the
    # D values in context, guessed without matching the key.
    ax.axhline(1 / max(1, t // int(cfg.pairs_per_len)), color="gray",
               ls="--", lw=1, label="1/D (guess a context value)")
    ax.set_xscale("log", base=2)
    ax.set_xlim(min(results["widths"]) / 1.3, max(results["widths"]) * 1.3)
    ax.set_xticks(results["widths"], [str(w) for w in results["widths"]])
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("model width d")
    if i == 0:
      ax.set_ylabel("MQAR accuracy")
    ax.set_title(f"T = {t}, {max(1, t // int(cfg.pairs_per_len))} pairs")
    ax.grid(True, alpha=0.3)
  axes[0][-1].legend(fontsize=7, loc="lower right")
  fig.suptitle(f"Multi-query associative recall (vocab {cfg.vocab}, "
               f"{cfg.num_layers} layers, {cfg.steps} steps)", y=1.02)
  fig.tight_layout()
  common.save_figure(fig, workdir, "accuracy_vs_width.png")
  common.phase("figure")


def main(argv):
  del argv
  res, path = common.run_study_main(run_study, stopped=(sweep.Stopped,))
  if res is not None:
    rows = sorted(res["table"], key=lambda r: (r["seq_len"], r["width"],
                                               r["mechanism"]))
    print(f"{'mechanism':22s} {'d':>4s} {'T':>4s} {'acc':>6s}")
    for r in rows:
      print(f"{r['mechanism']:22s} {r['width']:4d} {r['seq_len']:4d} "
            f"{r['accuracy']:6.3f}")
    print(f"this run: {res['wall_time_s']:.0f} s wall, "
          f"{res.get('cpu_time_s', float('nan')):.0f} s CPU (user + system)")
    print("results:", path)


if __name__ == "__main__":
  common.define_study_flags("recall_benchmark.py")
  app.run(main)
