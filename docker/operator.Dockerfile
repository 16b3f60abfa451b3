# syntax=docker/dockerfile:1
# kubeinfer operator: slim Python with kopf and the kubernetes client, no torch.
# Build: docker build -f docker/operator.Dockerfile -t ghcr.io/kubeinfer/operator:0.1.0 .

ARG PYTHON_BASE=python:3.11.11-slim-bookworm

# ---- builder ----
FROM ${PYTHON_BASE} AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml setup.py README.md constraints.txt ./
COPY kubeinfer ./kubeinfer
COPY engine ./engine
COPY operator ./operator
RUN pip install --no-cache-dir -c constraints.txt ".[operator]" \
 && find /opt/venv -name __pycache__ -type d -prune -exec rm -rf {} +

# ---- runtime ----
FROM ${PYTHON_BASE}
RUN useradd --uid 10001 --user-group --no-create-home kubeinfer
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1
USER 10001:10001
# No HEALTHCHECK: the Deployment's liveness probe calls the operator's liveness endpoint.
ENTRYPOINT ["kubeinfer", "operator"]
