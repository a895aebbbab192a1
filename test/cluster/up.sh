#!/usr/bin/env bash
# Bring up a single-node Kubernetes on this machine, from the binaries
# `make cluster-tools` built: etcd, containerd (Debian packages), the control
# plane, a kubelet, kube-proxy (nftables mode) and CoreDNS. Needs root.
#
# Every process is recorded in $CLUSTER_STATE/pids and runs in the cgroup
# $CLUSTER_CGROUP, so down.sh finds all of it, container processes included.
# Pods live on bridge $CLUSTER_BRIDGE; an nftables guard drops anything
# forwarded between the bridge and any other interface, so no pod packet
# leaves the machine. Idempotent: a running cluster is left as it is.
#
# Writes the admin kubeconfig to $CLUSTER_KUBECONFIG.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=env.sh
. "$here/env.sh"
TIMEOUT="${TIMEOUT:-120}"

die() {
	echo "cluster-up: $*" >&2
	exit 1
}
log() { echo "cluster-up: $*"; }

[[ "$(id -u)" == 0 ]] || die "needs root (it runs containerd, a kubelet and kube-proxy)"
for b in kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl kube-proxy coredns; do
	[[ -x "$K8S_BIN/$b" ]] || die "$K8S_BIN/$b is missing: run make cluster-tools"
done
for b in containerd containerd-shim-runc-v2 ctr runc etcd nft ip openssl go; do
	command -v "$b" >/dev/null || die "$b is not installed (apt-get install containerd runc containernetworking-plugins etcd-server nftables iproute2 openssl)"
done
[[ -x /usr/lib/cni/bridge && -x /usr/lib/cni/host-local && -x /usr/lib/cni/loopback ]] ||
	die "the CNI plugins are not in /usr/lib/cni (apt-get install containernetworking-plugins)"
kubectl() { "$K8S_BIN/kubectl" --kubeconfig "$CLUSTER_KUBECONFIG" "$@"; }

alive() { [[ -f "$CLUSTER_STATE/pids/$1" ]] && kill -0 "$(cat "$CLUSTER_STATE/pids/$1")" 2>/dev/null; }
if [[ -f "$CLUSTER_STATE/up" ]]; then
	all=true
	for p in etcd containerd kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy; do
		alive "$p" || all=false
	done
	if $all && kubectl get --raw /readyz >/dev/null 2>&1; then
		log "already up (kubeconfig $CLUSTER_KUBECONFIG)"
		exit 0
	fi
	die "a previous cluster is half up: run test/cluster/down.sh (make cluster-down) first"
fi
[[ -e "$CLUSTER_STATE" ]] && die "$CLUSTER_STATE exists from a failed start: run test/cluster/down.sh (make cluster-down) first"

busy=()
for p in "${CLUSTER_PORTS[@]}"; do
	if [[ -n "$(ss -Hltn "sport = :$p")" ]]; then busy+=("$p"); fi
done
((${#busy[@]} == 0)) || die "port(s) ${busy[*]} are in use; the cluster needs ${CLUSTER_PORTS[*]} free ($(ss -Hltnp | grep -E ":($(
	IFS='|'
	echo "${busy[*]}"
)) " | tr -s ' ' | head -3))"
ip link show "$CLUSTER_BRIDGE" >/dev/null 2>&1 && die "bridge $CLUSTER_BRIDGE exists: run make cluster-down"

mkdir -p "$CLUSTER_STATE"/{pids,logs,pki,etcd,cni/net.d,cni/ipam,kubelet,bin,images} "$CLUSTER_RUN"
chmod 0700 "$CLUSTER_STATE" "$CLUSTER_STATE/pki"
# What down.sh restores.
{
	for s in "${CLUSTER_SYSCTLS[@]}"; do
		if [[ -f "/proc/sys/$s" ]]; then echo "sysctl=$s=$(cat "/proc/sys/$s")"; fi
	done
	for d in /var/log/pods /var/log/containers /run/netns /var/lib/cni /etc/cni /opt/cni; do
		if [[ -e "$d" ]]; then echo "existed=$d"; fi
	done
	# The kubelet adds iptables chains (KUBE-IPTABLES-HINT, KUBE-KUBELET-CANARY);
	# with iptables-nft their tables may be new.
	nft list tables | sed 's/^table /table=/'
} >"$CLUSTER_STATE/restore"
echo starting >"$CLUSTER_STATE/up"

fail() {
	echo "cluster-up: failed; logs in $CLUSTER_STATE/logs (last lines below); make cluster-down cleans up" >&2
	for f in "$CLUSTER_STATE"/logs/*.log; do
		[[ -f "$f" ]] || continue
		echo "--- $f" >&2
		tail -n 15 "$f" >&2
	done
}
set -o errtrace
trap fail ERR

# Network: the bridge exists before the first pod so the API server and the
# kubelet can bind the node address on it.
log "bridge $CLUSTER_BRIDGE $CLUSTER_NODE_IP, forwarding guard"
ip link add "$CLUSTER_BRIDGE" type bridge
ip addr add "$CLUSTER_NODE_IP/${CLUSTER_POD_CIDR#*/}" dev "$CLUSTER_BRIDGE"
ip link set "$CLUSTER_BRIDGE" up
nft -f - <<NFT
table inet $CLUSTER_GUARD_TABLE {
	chain forward {
		type filter hook forward priority -10; policy accept;
		iifname "$CLUSTER_BRIDGE" oifname != "$CLUSTER_BRIDGE" counter drop comment "no pod packet leaves the machine"
		oifname "$CLUSTER_BRIDGE" iifname != "$CLUSTER_BRIDGE" counter drop comment "nothing outside reaches a pod"
	}
}
NFT
echo 1 >/proc/sys/net/ipv4/ip_forward
# Service replies between pods on one bridge must pass conntrack.
echo 1 >/proc/sys/net/bridge/bridge-nf-call-iptables

# cgroups: one tree per hierarchy, so down.sh finds every process.
for h in /sys/fs/cgroup/*/; do
	[[ -f "$h/cgroup.procs" ]] || continue
	mkdir -p "$h$CLUSTER_CGROUP/daemons"
	if [[ -f "${h}cpuset.cpus" ]]; then # a v1 cpuset admits no task until it has CPUs and memory nodes
		for c in "$CLUSTER_CGROUP" "$CLUSTER_CGROUP/daemons"; do
			cat "$(dirname "$h$c")/cpuset.cpus" >"$h$c/cpuset.cpus"
			cat "$(dirname "$h$c")/cpuset.mems" >"$h$c/cpuset.mems"
		done
	fi
done
if [[ -f /sys/fs/cgroup/cgroup.procs && -f /sys/fs/cgroup/cgroup.controllers ]]; then
	mkdir -p "/sys/fs/cgroup/$CLUSTER_CGROUP/daemons" # cgroup v2 only
fi

# start NAME CMD...: run CMD in the background in the cluster's cgroup.
start() {
	local name="$1"
	shift
	(
		for h in /sys/fs/cgroup/*/ /sys/fs/cgroup/; do
			if [[ -f "$h$CLUSTER_CGROUP/daemons/cgroup.procs" ]]; then
				echo "$BASHPID" >"$h$CLUSTER_CGROUP/daemons/cgroup.procs" || true
			fi
		done
		# Daemons outlive this script: they must not keep any descriptor
		# it inherited open (a caller's `flock` lock would stay held by
		# the cluster, and every later suite would wait for it forever).
		for fd in /proc/"$BASHPID"/fd/*; do
			fd="${fd##*/}"
			if ((fd > 2)); then
				eval "exec $fd>&-"
			fi
		done
		exec "$@"
	) </dev/null >"$CLUSTER_STATE/logs/$name.log" 2>&1 &
	echo $! >"$CLUSTER_STATE/pids/$name"
}

# wait_for WHAT CMD...: retry CMD once a second for $TIMEOUT seconds.
wait_for() {
	local what="$1" i
	shift
	for ((i = 0; i < TIMEOUT; i++)); do
		if "$@" >/dev/null 2>&1; then return 0; fi
		sleep 1
	done
	echo "cluster-up: timed out after ${TIMEOUT}s waiting for $what" >&2
	return 1
}

# PKI: one CA for the cluster; a client certificate per component.
log "certificates"
pki="$CLUSTER_STATE/pki"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 -subj /CN=meshproxy-cluster-ca \
	-keyout "$pki/ca.key" -out "$pki/ca.crt" 2>/dev/null
# cert NAME SUBJECT [SAN]
cert() {
	local ext
	ext="$(mktemp)"
	{
		echo "basicConstraints=CA:FALSE"
		echo "keyUsage=digitalSignature,keyEncipherment"
		if [[ -n "${3:-}" ]]; then
			echo "extendedKeyUsage=serverAuth,clientAuth"
			echo "subjectAltName=$3"
		else
			echo "extendedKeyUsage=clientAuth"
		fi
	} >"$ext"
	openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "$2" \
		-keyout "$pki/$1.key" -out "$pki/$1.csr" 2>/dev/null
	openssl x509 -req -in "$pki/$1.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
		-days 30 -extfile "$ext" -out "$pki/$1.crt" 2>/dev/null
	rm -f "$pki/$1.csr" "$ext"
}
cert apiserver /CN=kube-apiserver "DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,DNS:localhost,IP:127.0.0.1,IP:$CLUSTER_NODE_IP,IP:$CLUSTER_API_SVC_IP"
cert apiserver-kubelet-client "/O=kubeadm:cluster-admins/CN=kube-apiserver-kubelet-client"
cert admin "/O=system:masters/CN=admin"
cert controller-manager /CN=system:kube-controller-manager
cert scheduler /CN=system:kube-scheduler
cert kube-proxy /CN=system:kube-proxy
cert kubelet "/O=system:nodes/CN=system:node:$CLUSTER_NODE"
cert kubelet-serving "/O=system:nodes/CN=system:node:$CLUSTER_NODE" "DNS:$CLUSTER_NODE,IP:$CLUSTER_NODE_IP"
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$pki/sa.key" 2>/dev/null
openssl pkey -in "$pki/sa.key" -pubout -out "$pki/sa.pub"
server="https://$CLUSTER_NODE_IP:6443"
for c in admin controller-manager scheduler kube-proxy kubelet; do
	cat >"$pki/$c.kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters:
- name: meshproxy-cluster
  cluster:
    server: $server
    certificate-authority: $pki/ca.crt
users:
- name: $c
  user:
    client-certificate: $pki/$c.crt
    client-key: $pki/$c.key
contexts:
- name: meshproxy-cluster
  context: {cluster: meshproxy-cluster, user: $c}
current-context: meshproxy-cluster
KC
done

log "etcd"
start etcd etcd --name default --data-dir "$CLUSTER_STATE/etcd" \
	--listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
	--listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
	--initial-cluster default=http://127.0.0.1:2380
wait_for "etcd on 127.0.0.1:2379" curl -sf http://127.0.0.1:2379/health

log "containerd"
cat >"$CLUSTER_STATE/containerd.toml" <<TOML
version = 2
root = "$CLUSTER_STATE/containerd"
state = "$CLUSTER_RUN/containerd"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs", "io.containerd.internal.v1.opt"]
[grpc]
  address = "$CLUSTER_CONTAINERD_SOCK"
[ttrpc]
  address = "$CLUSTER_RUN/containerd/containerd.sock.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$CLUSTER_PAUSE_IMAGE"
  # No CAP_SYS_RESOURCE here: without this every sandbox fails in runc.
  restrict_oom_score_adj = true
  enable_selinux = false
  # Pod network namespaces under the state directory, not /run/netns.
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$CLUSTER_STATE/cni/net.d"
TOML
cat >"$CLUSTER_STATE/cni/net.d/10-meshproxy-cluster.conflist" <<CNI
{
  "cniVersion": "1.0.0",
  "name": "meshproxy-cluster",
  "plugins": [{
    "type": "bridge",
    "bridge": "$CLUSTER_BRIDGE",
    "isGateway": true,
    "ipMasq": false,
    "hairpinMode": true,
    "ipam": {
      "type": "host-local",
      "dataDir": "$CLUSTER_STATE/cni/ipam",
      "ranges": [[{"subnet": "$CLUSTER_POD_CIDR", "gateway": "$CLUSTER_NODE_IP"}]],
      "routes": [{"dst": "0.0.0.0/0"}]
    }
  }]
}
CNI
start containerd containerd --config "$CLUSTER_STATE/containerd.toml"
ctr() { command ctr --address "$CLUSTER_CONTAINERD_SOCK" --namespace k8s.io "$@"; }
wait_for "containerd on $CLUSTER_CONTAINERD_SOCK" ctr version

log "images: pause, coredns"
"$here/images.sh" pause coredns

log "kube-apiserver"
start kube-apiserver "$K8S_BIN/kube-apiserver" \
	--etcd-servers http://127.0.0.1:2379 \
	--bind-address "$CLUSTER_NODE_IP" --advertise-address "$CLUSTER_NODE_IP" --secure-port 6443 \
	--service-cluster-ip-range "$CLUSTER_SVC_CIDR" --service-node-port-range "$CLUSTER_NODEPORT_RANGE" \
	--client-ca-file "$pki/ca.crt" --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
	--kubelet-client-certificate "$pki/apiserver-kubelet-client.crt" --kubelet-client-key "$pki/apiserver-kubelet-client.key" \
	--kubelet-certificate-authority "$pki/ca.crt" --kubelet-preferred-address-types InternalIP \
	--service-account-issuer https://kubernetes.default.svc.cluster.local \
	--service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
	--authorization-mode Node,RBAC --enable-admission-plugins NodeRestriction \
	--allow-privileged=true --profiling=false --endpoint-reconciler-type lease
wait_for "the API server's /readyz on $server" kubectl get --raw /readyz
# kubeadm's binding for the API server's kubelet client.
kubectl create clusterrolebinding kubeadm:cluster-admins --clusterrole cluster-admin --group kubeadm:cluster-admins >/dev/null

log "kube-controller-manager, kube-scheduler"
start kube-controller-manager "$K8S_BIN/kube-controller-manager" \
	--kubeconfig "$pki/controller-manager.kubeconfig" \
	--authentication-kubeconfig "$pki/controller-manager.kubeconfig" --authorization-kubeconfig "$pki/controller-manager.kubeconfig" \
	--bind-address 127.0.0.1 --leader-elect=false --use-service-account-credentials \
	--service-account-private-key-file "$pki/sa.key" --root-ca-file "$pki/ca.crt" \
	--cluster-signing-cert-file "$pki/ca.crt" --cluster-signing-key-file "$pki/ca.key" \
	--service-cluster-ip-range "$CLUSTER_SVC_CIDR" --allocate-node-cidrs=false --profiling=false
start kube-scheduler "$K8S_BIN/kube-scheduler" \
	--kubeconfig "$pki/scheduler.kubeconfig" \
	--authentication-kubeconfig "$pki/scheduler.kubeconfig" --authorization-kubeconfig "$pki/scheduler.kubeconfig" \
	--bind-address 127.0.0.1 --leader-elect=false --profiling=false

log "kubelet"
echo "nameserver $CLUSTER_DNS_IP" >"$CLUSTER_STATE/resolv.conf"
cat >"$CLUSTER_STATE/kubelet.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $CLUSTER_NODE_IP
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $pki/ca.crt}
authorization: {mode: Webhook}
tlsCertFile: $pki/kubelet-serving.crt
tlsPrivateKeyFile: $pki/kubelet-serving.key
containerRuntimeEndpoint: unix://$CLUSTER_CONTAINERD_SOCK
# Hybrid cgroup v1 here: cgroupfs, and v1 allowed.
cgroupDriver: cgroupfs
cgroupRoot: /$CLUSTER_CGROUP
failCgroupV1: false
failSwapOn: false
clusterDNS: [$CLUSTER_DNS_IP]
clusterDomain: cluster.local
resolvConf: $CLUSTER_STATE/resolv.conf
# Images come from ctr import, never a registry: never collect them.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: 1Mi, nodefs.available: 1%, imagefs.available: 1%}
serializeImagePulls: false
protectKernelDefaults: false
YAML
start kubelet "$K8S_BIN/kubelet" --config "$CLUSTER_STATE/kubelet.yaml" \
	--kubeconfig "$pki/kubelet.kubeconfig" --root-dir "$CLUSTER_STATE/kubelet" \
	--hostname-override "$CLUSTER_NODE" --node-ip "$CLUSTER_NODE_IP"

log "kube-proxy (nftables)"
cat >"$CLUSTER_STATE/kube-proxy.yaml" <<YAML
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: nftables
clientConnection: {kubeconfig: $pki/kube-proxy.kubeconfig}
hostnameOverride: $CLUSTER_NODE
clusterCIDR: $CLUSTER_POD_CIDR
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
# NodePorts answer on the node address only (the bridge), never on other
# interfaces or on loopback, where other tests pick their ports.
nodePortAddresses: ["$CLUSTER_NODE_IP/32"]
# Leave the host's conntrack sysctls alone.
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
YAML
start kube-proxy "$K8S_BIN/kube-proxy" --config "$CLUSTER_STATE/kube-proxy.yaml"

wait_for "node $CLUSTER_NODE Ready" kubectl wait --for=condition=Ready "node/$CLUSTER_NODE" --timeout=2s

log "CoreDNS"
kubectl apply -f "$here/coredns.yaml" >/dev/null
wait_for "CoreDNS ready" kubectl -n kube-system rollout status deploy/coredns --timeout=2s

echo up >"$CLUSTER_STATE/up"
trap - ERR
log "up: export KUBECONFIG=$CLUSTER_KUBECONFIG (node $CLUSTER_NODE, API https://$CLUSTER_NODE_IP:6443)"
