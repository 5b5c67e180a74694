#!/usr/bin/env bash
# Installs pyro_mm (editable) with its test and notebook dependencies into the current Python.
# torch==2.13.0 (CPU build) is installed FIRST when torch is missing or too old, so that pip
# never resolves another torch build (which would download several GB of CUDA packages).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
PIP=("$PYTHON" -m pip install --progress-bar off --disable-pip-version-check)

if ! "$PYTHON" - <<'PY' 2>/dev/null
import sys
import torch
major, minor = (int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
sys.exit(0 if (major, minor) >= (2, 1) else 1)
PY
then
  echo "setup: installing torch==2.13.0 (CPU build)"
  "${PIP[@]}" "torch==2.13.0"
fi
echo "setup: installing pyro_mm and its dependencies"
"${PIP[@]}" -q -e ".[test]"
"$PYTHON" -c "import torch, pyro, pyro_mm; print(f'setup: torch {torch.__version__}, pyro {pyro.__version__}, pyro_mm {pyro_mm.__version__}')"
