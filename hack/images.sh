#!/usr/bin/env bash
# Build the container images (`make images`): engine (CUDA), engine (CPU) and operator.
#   IMAGE_PREFIX  registry/org of the images   (default ghcr.io/kubeinfer)
#   TAG           image tag                     (default: the version in pyproject.toml)
#   IMAGES        which ones, space-separated   (default "engine-cuda engine-cpu operator")
# Needs a Docker engine; without one it says so and exits 1 without building anything.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v docker >/dev/null 2>&1; then
  echo "hack/images.sh: the docker CLI is not installed; install Docker to build images." >&2
  exit 1
fi
if ! docker info >/dev/null 2>&1; then
  echo "hack/images.sh: no Docker engine is reachable (\`docker info\` failed); start one to build images." >&2
  exit 1
fi

IMAGE_PREFIX=${IMAGE_PREFIX:-ghcr.io/kubeinfer}
TAG=${TAG:-$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -n1)}
IMAGES=${IMAGES:-engine-cuda engine-cpu operator}

for image in $IMAGES; do
  case "$image" in
    engine-cuda) ref="$IMAGE_PREFIX/engine:$TAG" ;;
    engine-cpu) ref="$IMAGE_PREFIX/engine:$TAG-cpu" ;;
    operator) ref="$IMAGE_PREFIX/operator:$TAG" ;;
    *) echo "hack/images.sh: unknown image '$image' (engine-cuda, engine-cpu, operator)" >&2; exit 2 ;;
  esac
  echo ">> building $ref from docker/$image.Dockerfile"
  docker build --file "docker/$image.Dockerfile" --tag "$ref" .
done
