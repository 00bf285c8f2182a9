"""Executes a colab notebook top to bottom (used by the colab tests).

Notebooks read `ATTNJAX_COLAB_TINY=1` from the environment to shrink their
sizes; `run_notebook` sets it, runs every cell with nbclient in a fresh kernel
of the current interpreter, and returns the executed notebook.
"""

from __future__ import annotations

import os

import pytest


def run_notebook(path: str, *, timeout: int = 600, extra_env=None):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  nb = nbformat.read(path, as_version=4)
  env_backup = dict(os.environ)
  os.environ["ATTNJAX_COLAB_TINY"] = "1"
  os.environ.setdefault("MPLBACKEND", "Agg")
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
