#!/usr/bin/env bash
# `make gpu-check`: the GPU check (bench/gpu_check.py) with whichever Python has torch.
#   hack/gpu-check.sh [--dry-run] [--out DIR] [--skip engine|bench|tests] [--budget SECONDS]
# Python: $PYTHON, else .venv/bin/python, else python3 (a GPU image's own torch). Where kubeinfer is not
# installed from this tree (a bare GPU machine where nothing can be installed), it is imported from the tree
# through a link, so no network or pip is needed; the packages it cannot do without are torch, triton,
# transformers, pydantic, pytest, safetensors, tokenizers (and gguf for the bundled model).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd -P)
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python3; fi
fi
# Asked from / : run from here, `python -c` would find this tree's kubeinfer/ through the current directory.
INSTALLED=$(cd / && "$PYTHON" -c 'import kubeinfer.engine, os; print(os.path.realpath(kubeinfer.engine.__path__[0]))' \
            2>/dev/null || true)
if [ "$INSTALLED" != "$REPO/engine" ]; then
  # Not installed from this tree: a folder holding only a link to kubeinfer/ goes on PYTHONPATH (the tree's
  # root itself must not: its operator/ would shadow the standard library's operator module).
  SHIM=$(mktemp -d)
  ln -s "$REPO/kubeinfer" "$SHIM/kubeinfer"
  export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
  echo "gpu-check: kubeinfer from this tree through $SHIM (not installed from it in $PYTHON)"
fi
exec "$PYTHON" bench/gpu_check.py "$@"
