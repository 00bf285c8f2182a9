"""Which of 'xla' and 'chunked' `implementation=None` tries first.

The choice follows a crossover table measured per platform by

  python -m experiments.bench_attention --sections=crossover \\
      --write_crossover --workdir=runs/crossover

which times 'xla' against 'chunked' (interleaved repeats, one process) at
B=1, 8 heads, head_dim 64 over sequence lengths, causal and not, forward and
forward+backward, and stores the rows and the rule derived from them in
`crossover.json` next to this file, under the platform's name
(`jax.default_backend()`).

The rule (`derive_rule`): for each causality, the crossover length is the
smallest measured length L such that at L and at every longer measured
length, chunked is faster than xla by the geometric mean of its forward and
forward+backward time ratios (a call may or may not be differentiated, so
both count alike). `order` then puts 'chunked' first for a call whose
effective length sqrt(T * S) is >= that crossover, and also whenever the
float32 logits [B, N, T, S] would exceed `XLA_LOGITS_LIMIT_BYTES` (memory,
whatever the table says). A platform missing from the table, or a causality
for which chunked was never faster, uses the memory rule alone.
"""

from __future__ import annotations

import functools
import json
import math
import os
from typing import Dict, Iterable, List, Optional

import jax

# Above this many bytes of float32 logits, 'chunked' is tried first.
XLA_LOGITS_LIMIT_BYTES = 1 << 28
TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                          "crossover.json")


def _key(causal: bool) -> str:
  return "causal" if causal else "noncausal"


def derive_rule(rows: Iterable[Dict]) -> Dict[str, Optional[int]]:
  """Crossover lengths {'noncausal': L|None, 'causal': L|None} from rows.

  Each row: seq_len, causal, mode ('fwd' | 'fwd_bwd'), xla_s, chunked_s
  (seconds measured in the same run). A length counts only when both modes
  were measured there.
  """
  ratios: Dict[tuple, Dict[str, float]] = {}
  for r in rows:
    if r.get("xla_s") and r.get("chunked_s"):
      ratios.setdefault((bool(r["causal"]), int(r["seq_len"])), {})[
          r["mode"]] = r["chunked_s"] / r["xla_s"]
  rule = {}
  for causal in (False, True):
    lens = sorted(s for (c, s), m in ratios.items()
                  if c == causal and {"fwd", "fwd_bwd"} <= set(m))
    faster = {s: math.sqrt(ratios[(causal, s)]["fwd"] *
                           ratios[(causal, s)]["fwd_bwd"]) < 1.0 for s in lens}
    cross = None
    for s in reversed(lens):
      if not faster[s]:
        break
      cross = s
    rule[_key(causal)] = cross
  return rule


@functools.lru_cache(maxsize=4)
def load_table(path: str = TABLE_PATH) -> Dict:
  """The shipped crossover table ({} when the file is absent)."""
  try:
    with open(path) as fh:
      return json.load(fh)
  except FileNotFoundError:
    return {}


def crossover_length(causal: bool, platform: Optional[str] = None,
                     table: Optional[Dict] = None) -> Optional[int]:
  """Length from which 'chunked' goes first (None: memory rule only)."""
  table = load_table() if table is None else table
  platform = jax.default_backend() if platform is None else platform
  entry = table.get(platform)
  if not entry:
    return None
  return entry["rule"].get(_key(causal))


def order(b: int, t: int, n: int, s: int, causal: bool,
          platform: Optional[str] = None,
          table: Optional[Dict] = None) -> List[str]:
  """['chunked', 'xla'] or ['xla', 'chunked'] for a [B, N, T, S] call."""
  if b * n * t * s * 4 > XLA_LOGITS_LIMIT_BYTES:
    return ["chunked", "xla"]
  cross = crossover_length(causal, platform, table)
  if cross is not None and math.sqrt(t * s) >= cross:
    return ["chunked", "xla"]
  return ["xla", "chunked"]


def call_order(call) -> List[str]:
  """`order` for an `AttentionCall`."""
  b, t, n, s, *_ = call.shape
  return order(b, t, n, s, bool(call.is_causal))
