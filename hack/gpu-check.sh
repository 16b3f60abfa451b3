#!/usr/bin/env bash
# `make gpu-check`: the GPU check (bench/gpu_check.py) with whichever Python has torch.
#   hack/gpu-check.sh [--dry-run] [--out DIR] [--skip engine|bench|tests] [--budget SECONDS]
# Python: $PYTHON, else .venv/bin/python, else python3 (a GPU image's own torch). Without an installed
# kubeinfer (a bare GPU machine where nothing can be installed), the source tree is put on PYTHONPATH
# through a small shim package, so no network or pip is needed; the Python packages it cannot do without
# are torch, triton, transformers, pydantic, pytest, safetensors, tokenizers (and gguf for the bundled model).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if ! "$PYTHON" -c "import kubeinfer.engine" >/dev/null 2>&1 || \
   [ "$("$PYTHON" -c 'import kubeinfer, os; print(os.path.dirname(os.path.realpath(kubeinfer.__file__)))' 2>/dev/null)" != "$REPO/kubeinfer" ]; then
  SHIM=$(mktemp -d)/src
  mkdir -p "$SHIM/kubeinfer"
  for f in kubeinfer/*.py; do ln -s "$REPO/$f" "$SHIM/kubeinfer/"; done
  ln -s "$REPO/engine" "$SHIM/kubeinfer/engine"
  ln -s "$REPO/operator" "$SHIM/kubeinfer/operator"
  export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
  echo "gpu-check: kubeinfer from this tree through $SHIM (not installed in $PYTHON)"
fi
exec "$PYTHON" bench/gpu_check.py "$@"
