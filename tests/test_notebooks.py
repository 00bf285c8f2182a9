"""Notebook conventions: the install cell, Colab metadata, figure display.

The notebooks themselves are executed by their studies' tests
(tests/test_<study>.py via tests/notebook_runner.run_notebook, which asserts
every figure cell shows its `expected_figures`); here: static checks of every
notebook, the install cell run in a throwaway environment against this
checkout, and the inline display of figures made through
`experiments.common.setup_matplotlib` in a real kernel.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import sysconfig

import pytest

from tests import notebook_runner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTALL_CELL = os.path.join(ROOT, "colabs", "install_cell.py")
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "colabs", "*.ipynb")))


def _load(path):
  with open(path) as f:
    return json.load(f)


def _src(cell):
  s = cell["source"]
  return "".join(s) if isinstance(s, list) else s


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_starts_with_the_install_cell_and_has_colab_metadata(path):
  nb = _load(path)
  code = [c for c in nb["cells"] if c["cell_type"] == "code"]
  with open(INSTALL_CELL) as f:
    assert _src(code[0]) == f.read(), (
        f"{path}: the first code cell must be colabs/install_cell.py verbatim")
  assert "install" in code[0]["metadata"].get("tags", [])
  assert nb["metadata"]["kernelspec"]["name"] == "python3"
  assert "colab" in nb["metadata"], f"{path}: no Colab metadata"
  # Nothing assumes the working directory is the repository.
  for c in code[1:]:
    s = _src(c)
    assert "os.chdir" not in s and "sys.path" not in s, path
  text = "\n".join(_src(c) for c in nb["cells"] if c["cell_type"] == "markdown")
  assert "Try this" in text, f"{path}: no one-line 'Try this' suggestion"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_figure_cells_declare_expected_figures(path):
  # A cell that calls plt.show() / display(Image(...)) must say how many
  # figures it shows, so that run_notebook can check they were displayed.
  for c in _load(path)["cells"]:
    if c["cell_type"] != "code":
      continue
    s = _src(c)
    shows = s.count("plt.show()") + s.count("display(Image(")
    if shows:
      n = c["metadata"].get("expected_figures")
      assert isinstance(n, int) and n >= 1, (
          f"{path}: a cell showing figures has no expected_figures: {s[:80]!r}")


def test_figure_count_check_catches_missing_and_undeclared_figures():
  nbformat = pytest.importorskip("nbformat")
  png = {"output_type": "display_data", "data": {"image/png": "AA=="},
         "metadata": {}}
  c1 = nbformat.v4.new_code_cell("plt.show()", metadata={"expected_figures": 2})
  c1.outputs = [png]
  with pytest.raises(AssertionError, match="expected 2 figure"):
    notebook_runner.check_figures(nbformat.v4.new_notebook(cells=[c1]), "x")
  c1.outputs = [png, png]
  notebook_runner.check_figures(nbformat.v4.new_notebook(cells=[c1]), "x")
  c2 = nbformat.v4.new_code_cell("fig")
  c2.outputs = [png]
  with pytest.raises(AssertionError, match="no expected_figures"):
    notebook_runner.check_figures(nbformat.v4.new_notebook(cells=[c2]), "x")


def test_setup_matplotlib_keeps_the_kernels_inline_backend(tmp_path,
                                                          monkeypatch):
  # Regression: setup_matplotlib() forced matplotlib.use("Agg"), so figures
  # made in a notebook were never displayed. Runs a real kernel with the
  # backend a user would have (run_notebook drops MPLBACKEND).
  nbformat = pytest.importorskip("nbformat")
  nb = nbformat.v4.new_notebook(cells=[
      nbformat.v4.new_code_cell(
          "from experiments import common\n"
          "plt = common.setup_matplotlib()\n"
          "fig, ax = plt.subplots(); ax.plot([0, 1]); ax.set_title('t')\n"
          "plt.show()", metadata={"expected_figures": 1}),
  ])
  path = tmp_path / "fig.ipynb"
  nbformat.write(nb, str(path))
  monkeypatch.setenv("MPLBACKEND", "Agg")    # as CI sets it for the binaries
  out = notebook_runner.run_notebook(str(path), timeout=120)
  assert notebook_runner.count_figures(out.cells[0]) == 1


@pytest.mark.slow
def test_attention_analysis_colab_runs():
  # colabs/attention_analysis.ipynb (attnjax.analysis tools on a tiny ViT
  # trained in the notebook; the pretrained cell skips with CKPT = None).
  nb = notebook_runner.run_notebook(
      os.path.join(ROOT, "colabs", "attention_analysis.ipynb"), timeout=600)
  text = notebook_runner.output_text(nb)
  assert "row sums in" in text, text      # the notebook asserts them (1e-4)
  assert "rollout rows sum to 1: True" in text
  assert "pretrained analysis skipped" in text


def test_setup_matplotlib_outside_a_kernel_is_headless():
  code = ("import os; os.environ.pop('MPLBACKEND', None); os.environ.pop('DISPLAY', None)\n"
          "from experiments import common\n"
          "plt = common.setup_matplotlib()\n"
          "import matplotlib; print(matplotlib.get_backend().lower())")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True,
                     text=True, timeout=120, cwd=ROOT)
  assert r.returncode == 0, r.stderr
  assert r.stdout.strip().endswith("agg"), r.stdout


# --- the install cell, run against this checkout in a throwaway venv -------

def _shadow_venv(tmp_path):
  """A venv that sees this venv's packages except attnjax itself.

  Symlinks every entry of the current site-packages but attnjax's (its
  dist-info and editable finder) into a directory the new venv adds to its
  path, so `pip install -e CHECKOUT --no-deps --no-build-isolation` runs
  offline and installs attnjax into the new venv only.
  """
  pytest.importorskip("setuptools", reason="--no-build-isolation needs setuptools")
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)],
                 check=True, timeout=60)
  shadow = tmp_path / "shadow"
  shadow.mkdir()
  site = sysconfig.get_paths()["purelib"]
  for name in os.listdir(site):
    low = name.lower()
    if "attnjax" in low or low.endswith(".pth"):
      continue
    os.symlink(os.path.join(site, name), shadow / name)
  py = venv / "bin" / "python"
  new_site = subprocess.run(
      [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
      capture_output=True, text=True, check=True).stdout.strip()
  with open(os.path.join(new_site, "shadow.pth"), "w") as f:
    f.write(str(shadow) + "\n")
  return py


def _run_cell(py, cwd, env_extra, timeout=240):
  env = {k: v for k, v in os.environ.items()
         if k not in ("ATTNJAX_SOURCE", "PYTHONPATH", "VIRTUAL_ENV")}
  env.update(env_extra, JAX_PLATFORMS="cpu")
  with open(INSTALL_CELL) as f:
    cell = f.read()
  return subprocess.run([str(py), "-c", cell], cwd=str(cwd), env=env,
                        capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_install_cell_installs_the_checkout_and_reports_what_to_set(tmp_path):
  py = _shadow_venv(tmp_path)
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  probe = ("import importlib.util as u; "
           "print(u.find_spec('attnjax') is None, u.find_spec('experiments') is None)")
  assert subprocess.run([str(py), "-c", probe], cwd=elsewhere, capture_output=True,
                        text=True).stdout.split() == ["True", "True"]

  # Not installed, not in a checkout, nothing set: a clear message.
  r = _run_cell(py, elsewhere, {})
  assert r.returncode != 0
  assert "ATTNJAX_SOURCE" in r.stderr and "checkout path or a pip spec" in r.stderr

  # ATTNJAX_SOURCE naming something that is not a checkout.
  r = _run_cell(py, elsewhere, {"ATTNJAX_SOURCE": str(elsewhere)})
  assert r.returncode != 0 and "not inside an attnjax checkout" in r.stderr

  # Found by walking up from a notebook's directory inside the checkout.
  r = _run_cell(py, os.path.join(ROOT, "colabs"),
                {"ATTNJAX_PIP_ARGS": "--no-deps --no-build-isolation"})
  assert r.returncode == 0, r.stdout + r.stderr
  assert "installing attnjax from " + ROOT in r.stdout
  assert f"from {os.path.join(ROOT, 'attnjax')}" in r.stdout
  # Installed for good: a new process elsewhere imports it from the checkout.
  r2 = subprocess.run(
      [str(py), "-c", "import attnjax, experiments; print(attnjax.__file__); "
                      "print(experiments.__file__)"],
      cwd=elsewhere, capture_output=True, text=True, timeout=120,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert r2.returncode == 0, r2.stderr
  assert r2.stdout.split() == [os.path.join(ROOT, "attnjax", "__init__.py"),
                               os.path.join(ROOT, "experiments", "__init__.py")]
  # Once importable the cell installs nothing.
  r3 = _run_cell(py, elsewhere, {})
  assert r3.returncode == 0 and "installing" not in r3.stdout, r3.stdout + r3.stderr
