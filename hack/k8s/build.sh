#!/usr/bin/env bash
# Build (once) the Kubernetes control plane and test tools from the Go module proxy into
#   ${KUBEINFER_CACHE:-~/.cache/kubeinfer}/k8s-<K8S_VERSION>/bin
# Each binary group has a stamp holding the hash of its pins: it is rebuilt only when they change.
# Prints the bin dir on the last line of stdout.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=versions.env
source "$HERE/versions.env"

CACHE="${KUBEINFER_CACHE:-$HOME/.cache/kubeinfer}"
BIN="$CACHE/k8s-$K8S_VERSION/bin"
mkdir -p "$BIN"
# One build at a time per cache (parallel test runs wait here instead of compiling twice).
exec 9>"$CACHE/k8s-$K8S_VERSION/.build.lock"
flock 9
export CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS=-mod=mod
JOBS="${KUBEINFER_BUILD_JOBS:-2}"

command -v go >/dev/null || { echo "build.sh: the Go toolchain is required (https://go.dev/dl)" >&2; exit 1; }

log() { echo "[k8s-build] $*" >&2; }

# up_to_date NAME PINS... : true when the stamp for NAME holds the hash of PINS (and the Go version).
# Delete bin/.NAME.stamp to force a rebuild of that group.
stamp_hash() { printf '%s\n' "$@" "$(go env GOVERSION)" | sha256sum | cut -c1-16; }
up_to_date() {
  local name=$1; shift
  [ -f "$BIN/.$name.stamp" ] && [ "$(cat "$BIN/.$name.stamp")" = "$(stamp_hash "$@")" ]
}
mark() { local name=$1; shift; stamp_hash "$@" > "$BIN/.$name.stamp"; }

timed() {
  local name=$1; shift
  local t0=$SECONDS
  "$@"
  log "$name built in $((SECONDS - t0))s"
}

# --- kubeconform and helm: plain `go install` of pinned versions (their own go.mod) ---
build_tool() {  # NAME PACKAGE@VERSION [EXTRA_LDFLAGS]
  local name=$1 pkg=$2 extra=${3:-}
  local ld="-s -w $extra" pins=("$pkg" ${extra:+"$extra"})
  if up_to_date "$name" "${pins[@]}"; then log "$name up to date ($pkg)"; return; fi
  log "building $name ($pkg)"
  timed "$name" env GOBIN="$BIN" GOFLAGS= go install -p "$JOBS" -trimpath -ldflags="$ld" "$pkg"
  mark "$name" "${pins[@]}"
}

build_tool kubeconform "github.com/yannh/kubeconform/cmd/kubeconform@$KUBECONFORM_VERSION" \
  "-X main.version=$KUBECONFORM_VERSION"

helm_pkg="$HELM_MODULE/cmd/helm@$HELM_VERSION"
if ! up_to_date helm "$helm_pkg"; then
  log "building helm ($helm_pkg)"
  hv="$HELM_MODULE/internal/version"
  timed helm env GOBIN="$BIN" GOFLAGS= go install -p "$JOBS" -trimpath \
    -ldflags="-s -w -X $hv.version=$HELM_VERSION -X $hv.gitTreeState=clean" "$helm_pkg"
  mark helm "$helm_pkg"
else
  log "helm up to date ($helm_pkg)"
fi

# --- kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, etcd: the wrapper module ---
minor="${K8S_VERSION#v1.}"; minor="${minor%%.*}"
date="$(cd "${TMPDIR:-/tmp}" && GOFLAGS= go list -m -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"Time": "\(.*\)".*/\1/p')"
ld="-s -w"
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ld+=" -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor"
  ld+=" -X $p.gitTreeState=clean -X $p.buildDate=${date:-1970-01-01T00:00:00Z}"
done
k8s_pins() { echo "$K8S_VERSION" "$ETCD_VERSION" "$(sha256sum "$HERE/go.mod" | cut -c1-16)" "$(echo "$ld" | sha256sum | cut -c1-16)"; }
# shellcheck disable=SC2046
if ! up_to_date k8s $(k8s_pins); then
  log "building kube-apiserver kube-controller-manager kube-scheduler kubectl $K8S_VERSION + etcd $ETCD_VERSION"
  out="$(mktemp -d "$BIN/.build.XXXXXX")"
  (cd "$HERE" && timed k8s go build -p "$JOBS" -trimpath -ldflags="$ld" -o "$out/" \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl go.etcd.io/etcd/server/v3)
  mv "$out/server" "$out/etcd"   # the main package go.etcd.io/etcd/server/v3 builds as "server"
  mv "$out"/* "$BIN/" && rmdir "$out"
  # shellcheck disable=SC2046
  mark k8s $(k8s_pins)   # after the build: go.mod as the build left it
else
  log "kube-apiserver/controller-manager/scheduler/kubectl $K8S_VERSION + etcd $ETCD_VERSION up to date"
fi

build_tool kwok "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"

# The kwok binary has no built-in stages (kwokctl adds them): ship kwok's own "fast" node/pod stages
# (node initialize + heartbeat, pod ready/complete/delete) of the pinned version as its --config.
STAGES="$CACHE/k8s-$K8S_VERSION/kwok/stages.yaml"
if ! up_to_date kwok-stages "$KWOK_VERSION" || [ ! -f "$STAGES" ]; then
  dir="$(cd "${TMPDIR:-/tmp}" && GOFLAGS= go mod download -json "sigs.k8s.io/kwok@$KWOK_VERSION" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')"
  mkdir -p "$(dirname "$STAGES")"
  for f in node/fast/node-initialize.yaml node/heartbeat/node-heartbeat.yaml \
           pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
    echo "---"; cat "$dir/kustomize/stage/$f"
  done > "$STAGES.tmp" && mv "$STAGES.tmp" "$STAGES"
  mark kwok-stages "$KWOK_VERSION"
  log "kwok stages written to $STAGES"
fi

log "binaries in $BIN: $(cd "$BIN" && ls | tr '\n' ' ')"
echo "$BIN"
