#!/usr/bin/env bash
# The test cluster's part of deploy/kind/demo.sh (make cluster-demo): the
# single-node cluster of test/cluster/up.sh and images imported into its
# containerd. Sourced by demo.sh (DEMO_PLATFORM), not run; platform-kind.sh
# is the same for kind.
set -euo pipefail

cluster_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=env.sh
. "$cluster_dir/env.sh"
# shellcheck disable=SC2034 # read by demo.sh
ctx_hint="KUBECONFIG=$CLUSTER_KUBECONFIG kubectl"
# shellcheck disable=SC2034 # read by demo.sh
platform_down_hint="Stop the cluster with make cluster-down (test/cluster/down.sh)."

k() { "$K8S_BIN/kubectl" --kubeconfig "$CLUSTER_KUBECONFIG" "$@"; }

platform_check_tools() {
	[[ "$(id -u)" == 0 ]] || die "the test cluster needs root (containerd, kubelet, kube-proxy)"
	[[ -x "$K8S_BIN/kubectl" ]] || die "no Kubernetes binaries in $K8S_BIN: run make cluster-tools"
	command -v go >/dev/null 2>&1 || die "go is not on PATH (1.26 or later)"
}

platform_cluster() {
	step "single-node cluster (test/cluster/up.sh)"
	"$cluster_dir/up.sh"
}

platform_load() {
	local tar
	for tar in "$@"; do
		ctr --address "$CLUSTER_CONTAINERD_SOCK" --namespace k8s.io images import "$tar"
	done
}
