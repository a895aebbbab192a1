#!/usr/bin/env bash
# demo-netns.sh — the transparent path of meshproxy, step by step, in network
# namespaces on this machine (needs root; nothing outside the namespaces is
# changed, and everything is removed on exit).
#
#   sudo scripts/demo-netns.sh            # nftables capture (default)
#   sudo MODE=iptables scripts/demo-netns.sh
#   sudo MODE=ebpf scripts/demo-netns.sh  # needs a cgroup v2 hierarchy
#
# Needs: iproute2, curl, python3 (the demo app), util-linux (setpriv), go (to
# build meshproxy unless MESHPROXY_BIN points at a binary).
set -euo pipefail

MODE=${MODE:-nftables}
ID=$$
NODE=mpdemo-node-$ID   # holds the bridge: the "node network"
CA=mpdemo-ca-$ID       # the certificate authority (istiod's CA role)
PODA=mpdemo-a-$ID      # client pod
PODB=mpdemo-b-$ID      # server pod
CA_IP=198.18.0.10
A_IP=198.18.0.1
B_IP=198.18.0.2
TD=cluster.local
WORK=$(mktemp -d /tmp/meshproxy-demo.XXXXXX)
PIDS=()
CGROUPS=()
REDIRECT_FLAGS=(--mode "$MODE")
CGROOT=

bold() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
say() { printf '   %s\n' "$*"; }
run() { printf '\033[2m$ %s\033[0m\n' "$*"; "$@"; }

cleanup() {
	set +e
	bold "Cleaning up"
	if [[ -x ${MP:-} ]]; then
		for pod in "$PODA" "$PODB"; do
			if [[ -e /var/run/netns/$pod ]]; then
				# shellcheck disable=SC2046 # cgroup_flag prints one word or nothing
				in_pod "$pod" "$MP" redirect uninstall "${REDIRECT_FLAGS[@]}" $(cgroup_flag "$pod") >/dev/null 2>&1
			fi
		done
	fi
	for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null; done
	for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null; done
	for ns in "$PODA" "$PODB" "$CA" "$NODE"; do ip netns del "$ns" 2>/dev/null; done
	for cg in "${CGROUPS[@]}"; do rmdir "$cg" 2>/dev/null; done
	rm -rf "$WORK"
	say "namespaces, capture rules, processes and files removed"
}
trap cleanup EXIT

if [[ $(id -u) -ne 0 ]]; then
	echo "demo-netns.sh: run as root (it creates network namespaces)" >&2
	exit 2
fi
case $MODE in nftables | iptables | ebpf) ;; *)
	echo "demo-netns.sh: MODE must be nftables, iptables or ebpf, not $MODE" >&2
	exit 2
	;;
esac
# The app runs as an ordinary user: prefer the system's python3.
PYTHON=${PYTHON:-$(command -v /usr/bin/python3 || command -v python3 || true)}
if [[ -z $PYTHON ]]; then
	echo "demo-netns.sh: python3 not found (the demo app)" >&2
	exit 2
fi
for tool in ip curl nsenter setpriv; do
	command -v "$tool" >/dev/null || {
		echo "demo-netns.sh: $tool not found" >&2
		exit 2
	}
done

# in_pod POD CMD...: run CMD in the pod's network namespace, keeping the host's
# /sys (cgroup v2 and bpffs) in view, unlike `ip netns exec`.
in_pod() {
	local pod=$1
	shift
	nsenter --net="/var/run/netns/$pod" "$@"
}

# exec_in_pod POD UID CMD...: become CMD as a container of the pod would run:
# as UID (and gid, no supplementary groups), in the pod's network namespace
# and (ebpf mode) in the pod's cgroup. It replaces the calling (sub)shell, so
# a background job's $! is the program itself.
exec_in_pod() {
	local pod=$1 uid=$2
	shift 2
	local -a enter=(nsenter --net="/var/run/netns/$pod" setpriv --reuid "$uid" --regid "$uid" --clear-groups)
	if [[ $MODE == ebpf ]]; then
		echo "$BASHPID" >"$(pod_cgroup "$pod")/cgroup.procs"
	fi
	exec "${enter[@]}" "$@"
}

# app_in_pod POD UID CMD...: run CMD with exec_in_pod and wait for it.
app_in_pod() { (exec_in_pod "$@"); }

# cgroup_flag POD: --cgroup for ebpf mode, nothing otherwise.
cgroup_flag() {
	if [[ $MODE == ebpf ]]; then printf -- '--cgroup=%s' "$(pod_cgroup "$1")"; fi
}
pod_cgroup() { printf '%s/mpdemo-%s' "$CGROOT" "$1"; }

# start_in_pod POD UID CMD...: start CMD in the background, in the pod's
# cgroup (ebpf mode) and network namespace, as UID; logs go to $WORK.
start_in_pod() {
	local pod=$1 uid=$2
	shift 2
	local log
	log="$WORK/$(basename "$1")-$pod.log"
	(exec_in_pod "$pod" "$uid" "$@") >"$log" 2>&1 &
	PIDS+=($!)
}

# wait_for DESCRIPTION CMD...: retry CMD for up to 30 seconds.
wait_for() {
	local what=$1
	shift
	for _ in $(seq 1 60); do
		if "$@" >/dev/null 2>&1; then return 0; fi
		sleep 0.5
	done
	echo "demo-netns.sh: gave up waiting for $what; the logs say:" >&2
	for f in "$WORK"/*.log; do
		[[ -e $f ]] && { echo "--- $f" && tail -n 20 "$f"; } >&2
	done
	exit 1
}

bold "Building meshproxy"
if [[ -n ${MESHPROXY_BIN:-} ]]; then
	MP=$MESHPROXY_BIN
	say "using $MP"
else
	MP=$WORK/meshproxy
	run go build -o "$MP" "$(dirname "$0")/../cmd/meshproxy"
fi
chmod 755 "$WORK"

if [[ $MODE == ebpf ]]; then
	CGROOT=$(awk '$9 == "cgroup2" { print $5; exit }' /proc/self/mountinfo)
	if [[ -z $CGROOT ]]; then
		echo "demo-netns.sh: MODE=ebpf needs a cgroup v2 hierarchy" >&2
		exit 1
	fi
	for pod in "$PODA" "$PODB"; do
		mkdir "$(pod_cgroup "$pod")"
		CGROUPS+=("$(pod_cgroup "$pod")")
	done
fi

bold "1. A tiny network: two pods and a CA on one bridge"
say "Each pod is a network namespace, as in Kubernetes. A bridge in a fourth"
say "namespace plays the node's network; addresses come from 198.18.0.0/15."
for ns in "$NODE" "$CA" "$PODA" "$PODB"; do ip netns add "$ns"; done
ip -n "$NODE" link add br0 type bridge
ip -n "$NODE" link set br0 up
i=0
for pair in "$CA:$CA_IP" "$PODA:$A_IP" "$PODB:$B_IP"; do
	ns=${pair%%:*} addr=${pair##*:}
	i=$((i + 1))
	ip link add "mpd${ID}n$i" netns "$NODE" type veth peer name eth0 netns "$ns"
	ip -n "$NODE" link set "mpd${ID}n$i" master br0 up
	ip -n "$ns" link set lo up
	ip -n "$ns" addr add "$addr/24" dev eth0
	ip -n "$ns" link set eth0 up
	say "$ns: eth0 $addr"
done

bold "2. The CA: a root, an intermediate, and token authentication"
say "meshproxy ca writes Istio's plugged-in CA layout; each workload proves who"
say "it is with a bootstrap token (in Kubernetes: its ServiceAccount token)."
run "$MP" ca init --dir "$WORK/ca" --trust-domain "$TD"
printf 'token-a spiffe://%s/ns/default/sa/client\ntoken-b spiffe://%s/ns/default/sa/server\n' "$TD" "$TD" >"$WORK/tokens"
printf 'token-a' >"$WORK/token-a"
printf 'token-b' >"$WORK/token-b"
cp "$WORK/ca/root-cert.pem" "$WORK/root-cert.pem" # the CA's directory is private
chmod 644 "$WORK/token-a" "$WORK/token-b" "$WORK/root-cert.pem"
ip netns exec "$CA" "$MP" ca serve --dir "$WORK/ca" --auth token --tokens "$WORK/tokens" \
	--listen "$CA_IP:15012" --serving-dns "$CA_IP" --metrics "" >"$WORK/ca.log" 2>&1 &
PIDS+=($!)
wait_for "the CA" ip netns exec "$CA" bash -c "echo >/dev/tcp/$CA_IP/15012"
say "CA listening on $CA_IP:15012"

bold "3. The app in pod B: a plain HTTP server on :8080"
start_in_pod "$PODB" 1000 "$PYTHON" -m http.server 8080 --bind 0.0.0.0 --directory "$WORK"
wait_for "the app" in_pod "$PODB" bash -c "echo >/dev/tcp/127.0.0.1/8080"
say "it knows nothing about TLS or identities"

bold "4. The init step: traffic capture in both pods ($MODE)"
say "Outbound TCP goes to the sidecar on :15001, inbound to :15006; the sidecar's"
say "own traffic (uid 1337), loopback and the proxy's ports are left alone."
for pod in "$PODA" "$PODB"; do
	# shellcheck disable=SC2046 # cgroup_flag prints one word or nothing
	run in_pod "$pod" "$MP" redirect install "${REDIRECT_FLAGS[@]}" $(cgroup_flag "$pod")
done
# shellcheck disable=SC2046
run in_pod "$PODA" "$MP" redirect status "${REDIRECT_FLAGS[@]}" $(cgroup_flag "$PODA")

bold "5. The sidecars, as uid 1337, STRICT mTLS"
say "Each generates a key in memory, sends a CSR with its token to the CA and"
say "gets a 24h SPIFFE certificate; destinations in --mesh-cidrs get mesh mTLS."
for pod in "$PODA" "$PODB"; do
	tok=$WORK/token-a
	[[ $pod == "$PODB" ]] && tok=$WORK/token-b
	start_in_pod "$pod" 1337 "$MP" run --ca-addr "$CA_IP:15012" --ca-root "$WORK/root-cert.pem" \
		--token-file "$tok" --inbound :15006 --outbound :15001 --mesh-cidrs 198.18.0.0/15 --mode STRICT \
		--drain-timeout 2s
done
for pod in "$PODA" "$PODB"; do
	wait_for "the sidecar in $pod" in_pod "$pod" curl -sf http://127.0.0.1:15021/healthz/ready
done
run in_pod "$PODA" "$MP" identity --admin 127.0.0.1:15000

bold "6. Plain HTTP from pod A to pod B — encrypted in between"
say "curl in pod A speaks plain HTTP to $B_IP:8080. A's sidecar captures it, opens"
say "mesh mTLS to B; B's sidecar captures that, verifies A's SPIFFE ID, and hands"
say "plain HTTP to the app. Neither program changed."
run app_in_pod "$PODA" 1000 curl -s -o /dev/null -w 'HTTP %{http_code} from %{remote_ip}:%{remote_port}\n' "http://$B_IP:8080/"
say "A long-lived connection, so B's sidecar can show who is connected:"
start_in_pod "$PODA" 1000 "$PYTHON" -c "import socket,time; s=socket.create_connection(('$B_IP',8080)); time.sleep(30)"
HOLD=${PIDS[-1]}
wait_for "the connection to show up" bash -c "nsenter --net=/var/run/netns/$PODB '$MP' peers --admin 127.0.0.1:15000 | grep -q spiffe://"
run in_pod "$PODB" "$MP" peers --admin 127.0.0.1:15000
kill "$HOLD" 2>/dev/null || true
say "B's metrics count the mesh connections:"
in_pod "$PODB" curl -s http://127.0.0.1:15020/metrics | grep '^meshproxy_connections_total' || true

bold "7. A client without a sidecar is refused under STRICT"
say "uid 1337 bypasses A's capture, so this connection arrives at B in plain text:"
if app_in_pod "$PODA" 1337 curl -s -m 5 -o /dev/null "http://$B_IP:8080/"; then
	say "unexpected: it was served"
else
	say "refused, as it should be; B's sidecar counted why:"
	in_pod "$PODB" curl -s http://127.0.0.1:15020/metrics | grep '^meshproxy_connections_total' | grep -v 'decision="allow"' || true
fi

bold "Done"
say "Try MODE=iptables or MODE=ebpf for the other capture mechanisms."
