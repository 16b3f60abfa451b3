#!/usr/bin/env bash
# make cluster-up / cluster-down: a real control plane on 127.0.0.1, state in .kube/ (gitignored).
#   hack/k8s/cluster.sh up     # start; prints `export KUBECONFIG=...`
#   hack/k8s/cluster.sh down   # stop every process
#   hack/k8s/cluster.sh env    # print the export lines again
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
exec "$PY" hack/k8s/controlplane.py "${1:-up}" "${@:2}"
