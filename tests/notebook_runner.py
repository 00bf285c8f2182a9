"""Executes a colab notebook top to bottom (used by the colab tests).

Notebooks read `ATTNJAX_COLAB_TINY=1` from the environment to shrink their
sizes; `run_notebook` sets it, runs every cell with nbclient in a fresh kernel
of the current interpreter with the plotting backend a user would have (the
kernel's inline backend: MPLBACKEND is removed from the environment), checks
the displayed figures (`check_figures`) and returns the executed notebook.

Figure convention: a cell that displays figures carries the cell metadata
`"expected_figures": N`; its executed outputs must hold exactly N
`image/png` outputs, and a cell without that metadata must hold none.
"""

from __future__ import annotations

import os

import pytest


def count_figures(cell) -> int:
  """Number of image/png outputs of an executed code cell."""
  return sum(1 for out in cell.get("outputs", [])
             if "image/png" in out.get("data", {}))


def check_figures(nb, path: str = "") -> None:
  """Asserts each code cell shows exactly its `expected_figures` images."""
  errors = []
  for i, cell in enumerate(nb.cells):
    if cell.get("cell_type") != "code":
      continue
    want = cell.get("metadata", {}).get("expected_figures")
    got = count_figures(cell)
    head = "".join(cell.get("source", ""))[:60].replace("\n", " ")
    if want is None and got:
      errors.append(f"cell {i} ({head!r}) shows {got} figure(s) but has no "
                    "expected_figures metadata")
    elif want is not None and got != want:
      errors.append(f"cell {i} ({head!r}): expected {want} figure(s), "
                    f"{got} displayed")
  assert not errors, f"{path}: " + "; ".join(errors)


def run_notebook(path: str, *, timeout: int = 600, extra_env=None,
                 figures: bool = True):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  nb = nbformat.read(path, as_version=4)
  env_backup = dict(os.environ)
  os.environ["ATTNJAX_COLAB_TINY"] = "1"
  # The backend a user has in a notebook: the kernel's inline one. (CI sets
  # MPLBACKEND=Agg for the binaries; inside a kernel it would hide figures.)
  os.environ.pop("MPLBACKEND", None)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  if extra_env:
    os.environ.update(extra_env)
  try:
    # 'python3' is the native kernel: jupyter_client launches it with this
    # interpreter (the project venv), whatever kernelspecs exist globally.
    client = nbclient.NotebookClient(
        nb, timeout=timeout, kernel_name="python3",
        resources={"metadata": {"path": os.path.dirname(os.path.abspath(path))}})
    client.execute()
  finally:
    os.environ.clear()
    os.environ.update(env_backup)
  if figures:
    check_figures(nb, path)
  return nb


def output_text(nb) -> str:
  """All stream/text outputs of an executed notebook, concatenated."""
  chunks = []
  for cell in nb.cells:
    for out in cell.get("outputs", []):
      if out.get("output_type") == "stream":
        chunks.append(out.get("text", ""))
      elif "data" in out and "text/plain" in out["data"]:
        chunks.append(out["data"]["text/plain"])
  return "\n".join(chunks)
