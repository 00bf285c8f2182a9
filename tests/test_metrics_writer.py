"""experiments.common.MetricsWriter after a kill: cut-short lines, rewrites."""

import builtins
import json

import pytest

from experiments import common


def _lines(path):
  with open(path) as f:
    return f.read()


def test_resume_drops_a_cut_short_last_line_and_keeps_the_rest(tmp_path):
  w = common.MetricsWriter(str(tmp_path))
  for s in range(1, 6):
    w.write(s, loss=1.0 / s)
  # A kill in the middle of write(6): part of a line, no newline.
  with open(w.path, "a") as f:
    f.write('{"step": 6, "loss": 0.16')
  assert [r["step"] for r in w.read()] == [1, 2, 3, 4, 5]
  w.resume_from(4)
  assert [r["step"] for r in w.read()] == [1, 2, 3, 4]
  w.write(5, loss=0.2)
  text = _lines(w.path)
  assert text.endswith("\n")
  recs = [json.loads(l) for l in text.splitlines()]
  assert [r["step"] for r in recs] == [1, 2, 3, 4, 5]
  assert recs[-1]["loss"] == 0.2


def test_a_broken_line_before_the_end_is_an_error_naming_file_and_line(
    tmp_path):
  w = common.MetricsWriter(str(tmp_path))
  w.write(1, loss=1.0)
  with open(w.path, "a") as f:
    f.write("not json\n")
  w.write(2, loss=0.5)
  with pytest.raises(ValueError, match=r"metrics\.jsonl, line 2"):
    w.read()
  with pytest.raises(ValueError, match=r"line 2"):
    w.resume_from(1)
  assert [l for l in _lines(w.path).splitlines()][1] == "not json"


def test_a_kill_during_the_rewrite_leaves_the_old_file_whole(
    tmp_path, monkeypatch):
  w = common.MetricsWriter(str(tmp_path))
  for s in range(1, 4):
    w.write(s, loss=float(s))
  before = _lines(w.path)

  class Killed(BaseException):
    pass

  real_open = builtins.open

  def open_then_die_on_write(path, mode="r", *a, **k):
    f = real_open(path, mode, *a, **k)
    if "w" in mode:          # the file is opened (truncated), then the kill
      f.close()
      raise Killed()
    return f

  monkeypatch.setattr(common, "open", open_then_die_on_write, raising=False)
  with pytest.raises(Killed):
    w.resume_from(2)
  monkeypatch.undo()
  assert _lines(w.path) == before
  assert not (tmp_path / "metrics.jsonl.tmp").exists()
  w.resume_from(2)
  assert [r["step"] for r in w.read()] == [1, 2]


def test_resume_without_a_checkpoint_clears_and_with_none_keeps_nothing(
    tmp_path):
  w = common.MetricsWriter(str(tmp_path))
  w.write(0, loss=1.0)
  w.write(1, loss=0.5)
  w.resume_from(-1)
  assert w.read() == []
  w.write(0, loss=1.0)
  w.resume_from(None)
  assert w.read() == []
