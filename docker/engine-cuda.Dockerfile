# syntax=docker/dockerfile:1
# kubeinfer engine for NVIDIA GPUs: `kubeinfer serve` on a pinned CUDA runtime base.
# Build: docker build -f docker/engine-cuda.Dockerfile -t ghcr.io/kubeinfer/engine:0.1.0 .
# (hack/images.sh builds all images; pin the base by digest in your registry mirror if you need
# bit-for-bit rebuilds: FROM nvidia/cuda:13.0.0-runtime-ubuntu24.04@sha256:...)

ARG CUDA_BASE=nvidia/cuda:13.0.0-runtime-ubuntu24.04

# ---- builder: a virtualenv with torch (CUDA wheels), triton and kubeinfer[engine] ----
FROM ${CUDA_BASE} AS builder
ARG TORCH_VERSION=2.15.0
# Empty: the default index, whose Linux torch wheels are the CUDA build (their CUDA libraries come as wheels).
ARG TORCH_INDEX_URL=
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# The biggest layer first, so that code changes do not re-download torch.
RUN pip install --no-cache-dir ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml setup.py README.md constraints.txt ./
COPY kubeinfer ./kubeinfer
COPY engine ./engine
COPY operator ./operator
RUN pip install --no-cache-dir -c constraints.txt ".[engine]" \
 && find /opt/venv -name __pycache__ -type d -prune -exec rm -rf {} +

# ---- runtime: the CUDA runtime libraries, python3 and the virtualenv; no compilers ----
FROM ${CUDA_BASE}
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 10001 --user-group --no-create-home --home-dir /cache kubeinfer \
 && mkdir -p /cache \
 && chown 10001:10001 /cache
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/cache \
    HF_HOME=/cache/huggingface \
    TRITON_CACHE_DIR=/cache/triton
# Model weights and compiled kernels land here: mount a PVC (spec.model.cache) to keep them.
VOLUME ["/cache"]
USER 10001:10001
EXPOSE 8000
# No HEALTHCHECK: Kubernetes probes /health and /ready.
ENTRYPOINT ["kubeinfer", "serve"]
CMD ["--host", "0.0.0.0", "--port", "8000"]
