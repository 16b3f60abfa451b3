# kubeinfer developer entry points. `make run` and `make test` do all the set-up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test lint fmt venv bench-offline bench-serve gpu-check cluster-up cluster-down k8s-binaries metrics-binaries autoscaling-demo images e2e clean

$(STAMP): pyproject.toml constraints.txt hack/install.sh
	bash hack/install.sh
	touch $(STAMP)

venv: $(STAMP)

## Serve the bundled SmolLM2 on http://127.0.0.1:8000 (OpenAI-compatible).
run: $(STAMP)
	$(VENV)/bin/kubeinfer serve --host 127.0.0.1 --port 8000

## Lint, then every test (unit, integration, real control plane, real helm).
test: $(STAMP)
	$(VENV)/bin/ruff check .
	bash hack/test.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check .

fmt: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench-offline: $(STAMP)
	$(PY) bench/offline.py

bench-serve: $(STAMP)
	$(PY) bench/serve.py

## On a CUDA machine: compiled-Triton tests, engine vs transformers, decode bench; one report (< 8 min).
## `make gpu-check ARGS=--dry-run` runs the same pipeline on the CPU; ARGS="--out DIR" moves the report.
gpu-check:
	bash hack/gpu-check.sh $(ARGS)

## Build (once, cached in ~/.cache/kubeinfer) the Kubernetes control-plane binaries and tools.
k8s-binaries:
	bash hack/k8s/build.sh

## Start a real control plane (etcd, apiserver, controller-manager, scheduler, kwok) on 127.0.0.1.
cluster-up: k8s-binaries
	bash hack/k8s/cluster.sh up

cluster-down:
	bash hack/k8s/cluster.sh down

## The HPA-on-queue-depth loop with real engines, Prometheus and prometheus-adapter: live printout,
## .kube/autoscaling-demo.{json,png}. Builds the metrics stack on first use (hack/k8s/build-metrics.sh).
autoscaling-demo: $(STAMP) k8s-binaries
	$(VENV)/bin/python hack/k8s/autoscaling_demo.py

metrics-binaries:  # all of it, KEDA included (the demo builds only Prometheus + adapter)
	bash hack/k8s/build-metrics.sh

## Container images (needs a Docker engine).
images:
	bash hack/images.sh

## kind end-to-end test (needs a Docker engine).
e2e: $(STAMP)
	$(VENV)/bin/pytest -v e2e

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
