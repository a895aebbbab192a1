# shellcheck shell=bash disable=SC2034
# Shared settings of the single-node test cluster, sourced by up.sh, down.sh,
# images.sh and the demo's platform file. The Go suite (cluster_test.go)
# reads the same values from `env.sh print`.
K8S_VERSION=v1.37.2
MESHPROXY_CACHE="${MESHPROXY_CACHE:-$HOME/.cache/meshproxy}"
K8S_BIN="$MESHPROXY_CACHE/k8s-$K8S_VERSION/bin"
# Everything the cluster writes lives under these two directories.
CLUSTER_STATE="${CLUSTER_STATE:-/var/lib/meshproxy-cluster}"
CLUSTER_RUN="${CLUSTER_RUN:-/run/meshproxy-cluster}"
CLUSTER_KUBECONFIG="$CLUSTER_STATE/pki/admin.kubeconfig"
CLUSTER_NODE=meshproxy-node
CLUSTER_BRIDGE=mpk8s0
# Inside the demo's 10.244.0.0/16 and 10.96.0.0/16 (deploy/kind/demo.sh).
CLUSTER_POD_CIDR=10.244.0.0/24
CLUSTER_NODE_IP=10.244.0.1
CLUSTER_SVC_CIDR=10.96.0.0/16
CLUSTER_API_SVC_IP=10.96.0.1
CLUSTER_DNS_IP=10.96.0.10
# Between internal/e2eutil's loopback ports (20000-31999) and the kernel's
# ephemeral range (32768-): kube-proxy's NodePort rules never match a port
# another test package uses.
CLUSTER_NODEPORT_RANGE=32100-32767
# Fixed ports of the control plane and node agents.
CLUSTER_PORTS=(2379 2380 6443 10248 10249 10250 10256 10257 10259)
CLUSTER_CONTAINERD_SOCK="$CLUSTER_RUN/containerd/containerd.sock"
CLUSTER_CGROUP=meshproxy-cluster
CLUSTER_GUARD_TABLE=meshproxy-cluster-guard
CLUSTER_PAUSE_IMAGE=docker.io/library/meshproxy-pause:dev
# Host sysctls the node changes (ip_forward and bridge-nf-call-iptables by
# up.sh; the rest the kubelet sets at start), which down.sh restores.
CLUSTER_SYSCTLS=(net/ipv4/ip_forward net/bridge/bridge-nf-call-iptables vm/overcommit_memory vm/panic_on_oom
	kernel/panic kernel/panic_on_oops kernel/keys/root_maxkeys kernel/keys/root_maxbytes)

if [[ "${BASH_SOURCE[0]}" == "$0" && "${1:-}" == print ]]; then
	for v in K8S_VERSION K8S_BIN CLUSTER_STATE CLUSTER_RUN CLUSTER_KUBECONFIG CLUSTER_NODE CLUSTER_BRIDGE \
		CLUSTER_POD_CIDR CLUSTER_NODE_IP CLUSTER_SVC_CIDR CLUSTER_DNS_IP CLUSTER_NODEPORT_RANGE \
		CLUSTER_CONTAINERD_SOCK CLUSTER_CGROUP CLUSTER_GUARD_TABLE; do
		printf '%s=%s\n' "$v" "${!v}"
	done
	echo "CLUSTER_SYSCTLS=${CLUSTER_SYSCTLS[*]}"
fi
