#!/usr/bin/env bash
# The test command: build the control-plane and metrics-stack binaries if a Go toolchain exists, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v go >/dev/null 2>&1 && [ -f hack/k8s/build.sh ]; then
  bash hack/k8s/build.sh
  # The autoscaling tests' metrics stack (cached like the control plane; rebuilt only when a pin changes).
  bash hack/k8s/build-metrics.sh prometheus prometheus-adapter keda
fi
.venv/bin/python -P -m kubeinfer.engine.cpu_features || true  # the CPU paths this run takes
exec .venv/bin/pytest -q "$@"
