#!/usr/bin/env bash
# Prints an interpreter for the project venv: Python 3.12 preferred (the GPU
# image's version), else 3.11+. Each candidate is executed, not just looked up
# (pyenv shims exist for versions that are not selected).
for c in "${ATTNJAX_PYTHON:-}" python3.12 /root/.pyenv/versions/3.12*/bin/python3.12 \
         /usr/bin/python3.12 python3 python; do
  [ -n "$c" ] || continue
  if "$c" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' >/dev/null 2>&1; then
    command -v "$c" 2>/dev/null || echo "$c"
    exit 0
  fi
done
echo "no Python >= 3.11 found" >&2
exit 1
