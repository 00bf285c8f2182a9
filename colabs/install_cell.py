# Install attnjax when it is not importable (Colab, a fresh environment).
# Where from: $ATTNJAX_SOURCE (a checkout path or any pip spec, e.g.
# "git+https://<host>/<owner>/attnjax"), else the checkout this notebook
# sits in (searched upwards from the working directory). Extra pip
# arguments: $ATTNJAX_PIP_ARGS. This cell is colabs/install_cell.py verbatim.
import importlib, importlib.util, os, pathlib, shlex, subprocess, sys

NOTEBOOK_REQUIREMENTS = {"sklearn": "scikit-learn>=1.4"}  # module: pip spec


def _attnjax_checkout(start):
  for d in [start, *start.parents]:
    if (d / "pyproject.toml").is_file() and (d / "attnjax" / "__init__.py").is_file():
      return d
  return None


def _attnjax_install():
  pip = [sys.executable, "-m", "pip", "install", "-q",
         *shlex.split(os.environ.get("ATTNJAX_PIP_ARGS", ""))]
  if importlib.util.find_spec("attnjax") is None or importlib.util.find_spec("experiments") is None:
    source = os.environ.get("ATTNJAX_SOURCE", "").strip()
    local = _attnjax_checkout(pathlib.Path(source or os.getcwd()).expanduser().resolve())
    if source and not (source.startswith((".", "/", "~")) or os.path.isdir(source)):
      local = None                    # a pip spec (package index, git URL, wheel)
    elif source and local is None:
      raise RuntimeError(f"ATTNJAX_SOURCE={source!r} is not inside an attnjax checkout "
                         "(no pyproject.toml next to an attnjax/ package above it).")
    if local is None and not source:
      raise RuntimeError(
          "attnjax is not installed and this notebook is not inside an attnjax checkout. "
          "Set ATTNJAX_SOURCE to a checkout path or a pip spec and re-run this cell, e.g. "
          "`%env ATTNJAX_SOURCE=/content/attnjax` after `!git clone <repository URL> "
          "/content/attnjax`, or `%env ATTNJAX_SOURCE=git+<repository URL>`.")
    print("installing attnjax from", local or source, flush=True)
    subprocess.run(pip + (["-e", str(local)] if local else [source]), check=True)
    if local is not None:             # an editable install is seen by new processes only
      sys.path.insert(0, str(local))
  missing = [spec for mod, spec in NOTEBOOK_REQUIREMENTS.items()
             if importlib.util.find_spec(mod) is None]
  if missing:
    print("installing", *missing, flush=True)
    subprocess.run(pip + missing, check=True)
  importlib.invalidate_caches()
  import attnjax, experiments          # noqa: F401  (fails loudly if the install did not work)
  print("attnjax", getattr(attnjax, "__version__", ""), "from", os.path.dirname(attnjax.__file__))


_attnjax_install()
