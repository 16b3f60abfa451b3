#!/usr/bin/env bash
# Regenerate go.mod for K8S_VERSION in versions.env: require k8s.io/kubernetes and the etcd server it
# pins, and replace every staging module it lists at v0.0.0 with k8s.io/<name> v0.<minor>.<patch>.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=versions.env
source "$HERE/versions.env"
mod="$(cd "${TMPDIR:-/tmp}" && GOFLAGS= go mod download -json "k8s.io/kubernetes@$K8S_VERSION" |
  sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')"
staging="v0.${K8S_VERSION#v1.}"
etcd="$(awk '$1 == "go.etcd.io/etcd/server/v3" {print $2}' "$mod")"
{
  sed -n '1,/^module /{/^module /!p}' "$HERE/go.mod"   # keep the header comment
  echo 'module kubeinfer.dev/hack/k8s'
  echo
  echo "go $(awk '$1 == "go" {print $2; exit}' "$mod")"
  echo
  echo 'require ('
  echo "	go.etcd.io/etcd/server/v3 $etcd"
  echo "	k8s.io/kubernetes $K8S_VERSION"
  echo ')'
  echo
  echo 'replace ('
  awk '$1 ~ /^k8s\.io\// && $2 == "v0.0.0" {print $1}' "$mod" | sort -u |
    while read -r m; do printf '\t%s => %s %s\n' "$m" "$m" "$staging"; done
  echo ')'
} > "$HERE/go.mod.new"
mv "$HERE/go.mod.new" "$HERE/go.mod"
rm -f "$HERE/go.sum"
echo "go.mod: k8s.io/kubernetes $K8S_VERSION, staging $staging, etcd $etcd (set ETCD_VERSION=$etcd in versions.env)" >&2
