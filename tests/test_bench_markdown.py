"""experiments.bench_attention: the Markdown page written beside results.json."""

import json

from experiments import bench_attention


def _results():
  return {
      "backend": "cpu", "device": "cpu", "jax_version": "0.x",
      "command": "python -m experiments.bench_attention --sections=a,b",
      "load": {"start": {"loadavg_1m": 0.5, "loadavg_5m": 0.25,
                         "cpu_count": 2},
               "end": {"loadavg_1m": 1.5, "loadavg_5m": 0.75,
                       "cpu_count": 2}},
      "rows": [
          {"section": "a", "name": "m1", "mode": "fwd", "seq_len": 1024,
           "time_ms": 12.3456, "mem_mb": 3.0},
          {"section": "a", "name": "m1|x", "mode": "fwd", "seq_len": 4096,
           "time_ms": 50.0, "exponent": 1.0123, "fit_range": "1024..4096"},
          {"section": "b", "name": "m2", "mode": "fwd_bwd", "seq_len": 1024,
           "time_ms": None, "note": "not run: needs 9 GiB"},
      ],
      "targets": [
          {"section": "a", "target": "m1 fwd exponent <= 1.1", "ok": True,
           "value": 1.0123},
          {"section": "b", "target": "m2 fwd_bwd exponent <= 1.1",
           "ok": False, "value": 1.25},
      ],
  }


def _tables(md):
  """{section: [[cells] per row, header first]} of the page's tables."""
  out, cur = {}, None
  for line in md.splitlines():
    if line.startswith("### "):
      cur = out.setdefault(line[4:], [])
    elif line.startswith("|") and not line.startswith("|-") and \
        not line.startswith("|:") and "---" not in line:
      body = line.strip()[1:-1].replace("\\|", "\0")
      cur.append([c.strip().replace("\0", "|") for c in body.split("|")])
  return out


def test_page_has_one_table_per_section_with_every_row_and_target(tmp_path):
  res = _results()
  path = tmp_path / "results.json"
  path.write_text(json.dumps(res))
  md_path = bench_attention.write_markdown(str(path))
  assert md_path == str(tmp_path / "results.md")
  md = open(md_path).read()
  assert res["command"] in md
  assert "at start 0.5 (1 min) / 0.2 (5 min) on 2 CPUs" in md
  assert "at end 1.5 (1 min) / 0.8 (5 min) on 2 CPUs" in md
  tables = _tables(md)
  assert list(tables) == ["a", "b"]
  head_a, *rows_a = tables["a"]
  assert head_a == ["name", "mode", "seq_len", "time_ms", "mem_mb",
                    "exponent", "fit_range"]
  assert rows_a == [["m1", "fwd", "1024", "12.3", "3", "-", "-"],
                    ["m1|x", "fwd", "4096", "50", "-", "1.01", "1024..4096"]]
  head_b, *rows_b = tables["b"]
  assert head_b == ["name", "mode", "seq_len", "time_ms", "note"]
  assert rows_b == [["m2", "fwd_bwd", "1024", "-", "not run: needs 9 GiB"]]
  assert "Targets: 1 ok, 0 missed." in md
  assert "- ok: m1 fwd exponent <= 1.1: 1.01" in md
  assert "Targets: 0 ok, 1 missed." in md
  assert "- **MISSED**: m2 fwd_bwd exponent <= 1.1: 1.25" in md


def test_every_table_row_has_as_many_cells_as_its_header(tmp_path):
  path = tmp_path / "results.json"
  path.write_text(json.dumps(_results()))
  md = open(bench_attention.write_markdown(str(path))).read()
  for name, table in _tables(md).items():
    assert all(len(r) == len(table[0]) for r in table), name
  # the alignment row: numeric columns right-aligned
  align = [l for l in md.splitlines() if l.startswith("|--") or
           l.startswith("|---")][0]
  assert align == "|---|---|---:|---:|---:|---:|---|"
