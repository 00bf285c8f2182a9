"""implementation=None: the 'xla' / 'chunked' order follows the crossover
rule derived from the measured table shipped in attnjax/softmax/crossover.json
(issue 22 item 1). Tests the rule and that dispatch follows it, not timings.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax
from attnjax import softmax as sm
from attnjax.softmax import _auto


def _rows(ratios):
  """ratios: {(causal, S): (fwd chunked/xla, fwd_bwd chunked/xla)}."""
  rows = []
  for (causal, s), (rf, rb) in ratios.items():
    rows.append(dict(seq_len=s, causal=causal, mode="fwd", xla_s=1.0,
                     chunked_s=rf))
    rows.append(dict(seq_len=s, causal=causal, mode="fwd_bwd", xla_s=2.0,
                     chunked_s=2.0 * rb))
  return rows


def test_derive_rule_smallest_length_from_which_chunked_stays_faster():
  rows = _rows({
      (False, 256): (0.7, 1.6),     # geometric mean 1.06: xla
      (False, 512): (0.9, 1.2),     # 1.04: xla
      (False, 1024): (0.55, 0.95),  # 0.72: chunked
      (False, 2048): (0.5, 0.97),
      (True, 256): (0.6, 0.9),      # chunked, but 512 is not: not the start
      (True, 512): (1.1, 1.0),
      (True, 1024): (0.4, 0.4),
      (True, 2048): (0.35, 0.33),
  })
  assert _auto.derive_rule(rows) == {"noncausal": 1024, "causal": 1024}


def test_derive_rule_never_faster_and_missing_mode():
  rows = _rows({(False, 256): (1.5, 1.2), (False, 512): (0.5, 1.5)})
  # 512: sqrt(0.75) < 1 -> chunked, 256 not; only fwd measured at 1024.
  rows.append(dict(seq_len=1024, causal=False, mode="fwd", xla_s=1.0,
                   chunked_s=0.1))
  rows += _rows({(True, 256): (1.2, 1.1), (True, 512): (1.3, 1.01)})
  assert _auto.derive_rule(rows) == {"noncausal": 512, "causal": None}


def test_shipped_table_rule_follows_from_its_rows():
  table = _auto.load_table()
  assert "cpu" in table, "the CPU crossover table must be shipped"
  for platform, entry in table.items():
    assert _auto.derive_rule(entry["rows"]) == entry["rule"], platform
    assert entry["command"].startswith("python -m experiments.bench_attention")


@pytest.mark.parametrize("causal", [False, True])
def test_order_follows_the_shipped_cpu_rule(causal):
  cross = _auto.crossover_length(causal, platform="cpu")
  lens = sorted({r["seq_len"] for r in _auto.load_table()["cpu"]["rows"]})
  for s in lens + [64, 100000]:
    got = _auto.order(1, s, 1, s, causal, platform="cpu")
    big = 1 * 1 * s * s * 4 > _auto.XLA_LOGITS_LIMIT_BYTES
    want_chunked = big or (cross is not None and s >= cross)
    assert got[0] == ("chunked" if want_chunked else "xla"), (s, cross)
    assert sorted(got) == ["chunked", "xla"]


def test_order_effective_length_and_memory_rule():
  table = {"cpu": {"rule": {"noncausal": 1000, "causal": None}, "rows": []}}
  # sqrt(T * S) is compared with the crossover.
  assert _auto.order(1, 500, 8, 2000, False, "cpu", table)[0] == "chunked"
  assert _auto.order(1, 500, 8, 1999, False, "cpu", table)[0] == "xla"
  # Causal never crosses over: xla until the logits exceed the limit.
  assert _auto.order(1, 4096, 1, 4096, True, "cpu", table)[0] == "xla"
  assert _auto.order(4, 4096, 2, 4096, True, "cpu", table)[0] == "chunked"
  # An unknown platform uses the memory rule alone.
  assert _auto.order(1, 4096, 1, 4096, False, "tpu", table)[0] == "xla"


def test_dispatch_follows_the_rule(monkeypatch):
  """implementation=None runs the backend `order` puts first."""
  table = {jax.default_backend(): {
      "rule": {"noncausal": 48, "causal": 24}, "rows": []}}
  monkeypatch.setattr(_auto, "load_table", lambda path=None: table)
  used = []
  for name in ("xla", "chunked"):
    fn = sm.OP.backend(name)
    monkeypatch.setitem(sm.OP._backends, name,
                        lambda cfg, call, need_lse, fn=fn, name=name:
                        (used.append(name), fn(cfg, call, need_lse))[1])
  if jax.default_backend() == "gpu":
    monkeypatch.setitem(sm.OP._backends, "cudnn", _refuse)
  ks = jax.random.split(jax.random.key(0), 3)
  for s, causal, want in [(40, False, "xla"), (48, False, "chunked"),
                          (20, True, "xla"), (24, True, "chunked")]:
    q, k, v = (jax.random.normal(x, (1, s, 2, 8)) for x in ks)
    used.clear()
    out = attnjax.dot_product_attention(q, k, v, is_causal=causal)
    assert used == [want], (s, causal, used)
    ref = attnjax.dot_product_attention(q, k, v, is_causal=causal,
                                        implementation="xla")
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)


def _refuse(cfg, call, need_lse):
  raise NotImplementedError("refused in this test")
