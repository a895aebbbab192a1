#!/usr/bin/env bash
# The kind part of deploy/kind/demo.sh (make kind-demo): a kind cluster from
# kind-config.yaml and images loaded with kind load image-archive. Sourced by
# demo.sh, not run; test/cluster/platform.sh is the same for the test cluster.
set -euo pipefail

CLUSTER="${CLUSTER:-meshproxy}"
ctx="kind-$CLUSTER"
# shellcheck disable=SC2034 # read by demo.sh
ctx_hint="kubectl --context $ctx"
# shellcheck disable=SC2034 # read by demo.sh
platform_down_hint="Delete it with deploy/kind/down.sh (make kind-down)."

k() { kubectl --context "$ctx" "$@"; }

platform_check_tools() {
	local missing=() tool
	for tool in kind kubectl docker go; do
		command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
	done
	if ((${#missing[@]} > 0)); then
		cat >&2 <<MSG
demo: missing ${missing[*]}; install them and run again:
  kind     https://kind.sigs.k8s.io/docs/user/quick-start/#installation
  kubectl  https://kubernetes.io/docs/tasks/tools/
  docker   https://docs.docker.com/get-docker/ (kind runs its nodes in it)
  go       https://go.dev/dl/ (1.26 or later, to build meshproxy and the images)
MSG
		exit 1
	fi
	docker info >/dev/null 2>&1 || die "docker is installed but its daemon does not answer (is Docker running?)"
}

platform_cluster() {
	step "kind cluster $CLUSTER"
	local clusters
	clusters="$(kind get clusters 2>/dev/null || true)"
	if grep -qx "$CLUSTER" <<<"$clusters"; then
		echo "reusing the existing cluster"
	else
		kind create cluster --name "$CLUSTER" --config "$(dirname "${BASH_SOURCE[0]}")/kind-config.yaml" --wait 180s
	fi
}

platform_load() {
	local tar
	for tar in "$@"; do
		kind load image-archive "$tar" --name "$CLUSTER"
	done
}
