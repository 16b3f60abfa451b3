#!/usr/bin/env bash
# Build (once) llama.cpp's llama-server, the peer of bench/peers.py, from the llama.cpp sources vendored in
# PyPI's llama-cpp-python sdist (the package registry is all this machine reaches). Cached outside the clone:
#   ${KUBEINFER_CACHE:-~/.cache/kubeinfer}/llama.cpp-<LLAMA_CPP_PYTHON_VERSION>/bin/llama-server
# The CPU backend is built for the machine it runs on (GGML_NATIVE), as llama.cpp users build it.
# Prints the binary's path on the last line of stdout.
set -euo pipefail
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
CACHE="${KUBEINFER_CACHE:-$HOME/.cache/kubeinfer}"
ROOT="$CACHE/llama.cpp-$VERSION"
BIN="$ROOT/bin/llama-server"
CPU_KEY=$(grep -m1 '^flags' /proc/cpuinfo | sha256sum | cut -c1-12)  # GGML_NATIVE: one build per CPU
if [ -x "$BIN" ] && [ "$(cat "$ROOT/.cpu" 2>/dev/null)" = "$CPU_KEY" ]; then echo "$BIN"; exit 0; fi
mkdir -p "$ROOT"
exec 9>"$ROOT/.build.lock"
flock 9
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$work" >&2
tar -xzf "$work"/llama_cpp_python-*.tar.gz -C "$work"
src=$(echo "$work"/llama_cpp_python-*/vendor/llama.cpp)
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=OFF >&2
nice -n 10 cmake --build "$work/build" --target llama-server -j "${KUBEINFER_BUILD_JOBS:-2}" >&2
mkdir -p "$ROOT/bin"
cp "$work/build/bin/llama-server" "$BIN"
echo "$CPU_KEY" > "$ROOT/.cpu"
echo "$BIN"
