#!/usr/bin/env bash
# Build (once) the metrics stack for the autoscaling tests from the Go module proxy into the same bin dir
# as the control plane: ${KUBEINFER_CACHE:-~/.cache/kubeinfer}/k8s-<K8S_VERSION>/bin
#   prometheus          github.com/prometheus/prometheus  cmd/prometheus  (-tags remove_all_sd: file_sd and
#                       http_sd only, no cloud SDKs; without -tags builtinassets the web UI is left out, the
#                       HTTP API is all the tests use)
#   prometheus-adapter  sigs.k8s.io/prometheus-adapter   cmd/adapter
#   keda-operator       github.com/kedacore/keda/v2      cmd/operator
#   keda-adapter        github.com/kedacore/keda/v2      cmd/adapter (the external metrics apiserver)
# Each is built inside its own module (from the module cache) so that its go.mod's replace/exclude
# directives apply exactly as upstream's release builds apply them (`go install pkg@v` refuses modules
# that have them, and KEDA does). A stamp per binary holds the hash of its pins: rebuilt only when they change.
# Usage: build-metrics.sh [prometheus|prometheus-adapter|keda ...]   (default: all). Prints the bin dir last.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=versions.env
source "$HERE/versions.env"

CACHE="${KUBEINFER_CACHE:-$HOME/.cache/kubeinfer}"
BIN="$CACHE/k8s-$K8S_VERSION/bin"
mkdir -p "$BIN"
# Its own lock: the metrics stack can build while the control plane's build holds build.sh's lock.
exec 8>"$CACHE/k8s-$K8S_VERSION/.metrics-build.lock"
flock 8
# GOWORK=off: Prometheus ships a go.work naming modules its release zip leaves out.
export CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS=-mod=readonly GOWORK=off
JOBS="${KUBEINFER_BUILD_JOBS:-2}"
NICE=(nice -n "${KUBEINFER_BUILD_NICE:-10}")

command -v go >/dev/null || { echo "build-metrics.sh: the Go toolchain is required (https://go.dev/dl)" >&2; exit 1; }
log() { echo "[metrics-build] $*" >&2; }

stamp_hash() { printf '%s\n' "$@" "$(go env GOVERSION)" | sha256sum | cut -c1-16; }
up_to_date() {
  local name=$1; shift
  [ -x "$BIN/$name" ] && [ -f "$BIN/.$name.stamp" ] && [ "$(cat "$BIN/.$name.stamp")" = "$(stamp_hash "$@")" ]
}
mark() { local name=$1; shift; stamp_hash "$@" > "$BIN/.$name.stamp"; }

module_dir() {  # MODULE VERSION -> the module's extracted source in the module cache
  (cd "${TMPDIR:-/tmp}" && GOFLAGS= go mod download -json "$1@$2" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
}

# build NAME MODULE VERSION PACKAGE "TAGS" "LDFLAGS"
build() {
  local name=$1 mod=$2 ver=$3 pkg=$4 tags=$5 ld=$6
  local pins=("$mod@$ver" "$pkg" "$tags" "$ld")
  if up_to_date "$name" "${pins[@]}"; then log "$name up to date ($mod@$ver)"; return; fi
  local dir t0=$SECONDS
  dir="$(module_dir "$mod" "$ver")"
  [ -n "$dir" ] || { log "$mod@$ver is not served by the module proxy"; return 1; }
  log "building $name ($mod@$ver $pkg${tags:+ -tags $tags})"
  (cd "$dir" && "${NICE[@]}" go build -p "$JOBS" -trimpath -tags "$tags" -ldflags="-s -w $ld" \
    -o "$BIN/.$name.tmp" "./$pkg")
  mv "$BIN/.$name.tmp" "$BIN/$name"
  mark "$name" "${pins[@]}"
  log "$name built in $((SECONDS - t0))s"
}

pv=github.com/prometheus/common/version
prom_minor="${PROMETHEUS_VERSION#v0.}"   # module v0.316.0 is Prometheus 3.16.0
prom_ld="-X $pv.Version=${prom_minor:0:1}.${prom_minor:1} -X $pv.Branch=HEAD -X $pv.BuildUser=kubeinfer"
keda_ld="-X github.com/kedacore/keda/v2/version.Version=$KEDA_VERSION"
groups=("$@")
[ ${#groups[@]} -gt 0 ] || groups=(prometheus prometheus-adapter keda)
for g in "${groups[@]}"; do
  case "$g" in
    prometheus) build prometheus github.com/prometheus/prometheus "$PROMETHEUS_VERSION" cmd/prometheus \
      remove_all_sd "$prom_ld" ;;
    prometheus-adapter) build prometheus-adapter sigs.k8s.io/prometheus-adapter "$PROMETHEUS_ADAPTER_VERSION" \
      cmd/adapter "" "" ;;
    keda)
      build keda-operator github.com/kedacore/keda/v2 "$KEDA_VERSION" cmd/operator "" "$keda_ld"
      build keda-adapter github.com/kedacore/keda/v2 "$KEDA_VERSION" cmd/adapter "" "$keda_ld"
      # KEDA's CRDs (ScaledObject, ...) from the same release, beside its binaries.
      crds="$BIN/keda-crds-$KEDA_VERSION"
      if [ ! -d "$crds" ]; then
        mkdir -p "$crds.tmp" && cp "$(module_dir github.com/kedacore/keda/v2 "$KEDA_VERSION")"/config/crd/bases/*.yaml "$crds.tmp/"
        chmod u+w "$crds.tmp"/*.yaml && mv "$crds.tmp" "$crds"
      fi ;;
    *) log "unknown group $g (prometheus, prometheus-adapter, keda)"; exit 2 ;;
  esac
done
echo "$BIN"
