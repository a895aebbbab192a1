#!/usr/bin/env bash
# Tear down the test cluster up.sh started, completely and idempotently:
# every recorded process and everything left in the cluster's cgroups
# (container processes and shims), the pods' network namespaces, mounts
# under the state directories, the bridge, the nftables tables (the guard
# and kube-proxy's), the cgroups, the state directories, and the sysctls
# up.sh changed. Running it with no cluster up does nothing and succeeds.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=env.sh
. "$here/env.sh"
[[ "$(id -u)" == 0 ]] || {
	echo "cluster-down: needs root" >&2
	exit 1
}
log() { echo "cluster-down: $*"; }

# cgroup_pids: every process in the cluster's cgroups, any hierarchy.
cgroup_pids() {
	local f
	for f in /sys/fs/cgroup/*/"$CLUSTER_CGROUP" /sys/fs/cgroup/"$CLUSTER_CGROUP"; do
		[[ -d "$f" ]] || continue
		find "$f" -name cgroup.procs -exec cat {} + 2>/dev/null
	done | sort -un
}

# 1. The recorded processes, in reverse start order: SIGTERM, then SIGKILL.
order=(kube-proxy kubelet kube-scheduler kube-controller-manager kube-apiserver containerd etcd)
pids=()
for p in "${order[@]}"; do
	f="$CLUSTER_STATE/pids/$p"
	[[ -f "$f" ]] || continue
	pid="$(cat "$f")"
	# Only a process still running the recorded command is ours to stop.
	if kill -0 "$pid" 2>/dev/null && grep -qs "$CLUSTER_CGROUP" "/proc/$pid/cgroup"; then
		kill -TERM "$pid" 2>/dev/null || true
		pids+=("$pid")
	fi
done
for _ in $(seq 1 50); do
	left=()
	for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && left+=("$pid"); done
	((${#left[@]} == 0)) && break
	sleep 0.2
done
for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
((${#pids[@]} == 0)) || log "stopped ${#pids[@]} recorded processes"

# 2. Whatever is left in the cgroups: shims, pause and container processes.
for _ in $(seq 1 50); do
	mapfile -t rest < <(cgroup_pids)
	((${#rest[@]} == 0)) && break
	kill -KILL "${rest[@]}" 2>/dev/null || true
	sleep 0.2
done
mapfile -t rest < <(cgroup_pids)
((${#rest[@]} == 0)) || log "WARNING: processes ${rest[*]} survive in cgroup $CLUSTER_CGROUP"

# 3. Mounts under the state directories and the pods' network namespaces,
# deepest first.
mapfile -t mounts < <(awk -v s="$CLUSTER_STATE" -v r="$CLUSTER_RUN" \
	'index($5, s"/") == 1 || index($5, r"/") == 1 || $5 == s || $5 == r || $5 ~ /^\/run\/netns\/cni-/ {print $5}' \
	/proc/self/mountinfo | sort -r -u)
for m in "${mounts[@]}"; do
	umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || log "WARNING: cannot unmount $m"
done
((${#mounts[@]} == 0)) || log "unmounted ${#mounts[@]} mounts"
rm -f /run/netns/cni-*

# 4. Network: the bridge (the pods' veths went with their namespaces), the
# nftables tables, the sysctls.
if ip link show "$CLUSTER_BRIDGE" >/dev/null 2>&1; then
	ip link del "$CLUSTER_BRIDGE"
	log "deleted bridge $CLUSTER_BRIDGE"
fi
for t in "inet $CLUSTER_GUARD_TABLE" "ip kube-proxy" "ip6 kube-proxy"; do
	# shellcheck disable=SC2086 # family and name are two words
	if nft list table $t >/dev/null 2>&1; then
		nft delete table $t
		log "deleted nftables table $t"
	fi
done
restore="$CLUSTER_STATE/restore"
# The kubelet's iptables chains, then tables that only they filled.
for ipt in iptables ip6tables; do
	command -v "$ipt" >/dev/null || continue
	for t in mangle nat filter; do
		mapfile -t chains < <("$ipt" -t "$t" -S 2>/dev/null | awk '/^-N KUBE-/ {print $2}')
		# Jumps into them from other chains first (the kubelet's KUBE-FIREWALL
		# hangs off INPUT and OUTPUT): a referenced chain cannot be deleted,
		# and an empty one left behind still costs every packet a jump.
		mapfile -t from < <("$ipt" -t "$t" -S 2>/dev/null | awk '/^-A / && $2 !~ /^KUBE-/ && / -[jg] KUBE-/ {print $2}' | sort -u)
		for c in "${from[@]}"; do
			mapfile -t nums < <("$ipt" -t "$t" -L "$c" -n --line-numbers 2>/dev/null | awk '$2 ~ /^KUBE-/ {print $1}' | sort -rn)
			for n in "${nums[@]}"; do "$ipt" -t "$t" -D "$c" "$n" && log "deleted $ipt rule $t/$c $n (jump to a KUBE- chain)"; done
		done
		for c in "${chains[@]}"; do "$ipt" -t "$t" -F "$c" 2>/dev/null || true; done
		for c in "${chains[@]}"; do "$ipt" -t "$t" -X "$c" 2>/dev/null && log "deleted $ipt chain $t/$c"; done
	done
done
if [[ -f "$restore" ]]; then
	while read -r family name; do
		grep -qx "table=$family $name" "$restore" && continue
		case "$name" in filter | nat | mangle) ;; *) continue ;; esac
		# Rules carry a handle; chain declarations' type lines do not.
		if ! nft -a list table "$family" "$name" | grep -Pq '^\t\t(?!type ).*# handle \d+$'; then
			nft delete table "$family" "$name" && log "deleted empty nftables table $family $name"
		fi
	done < <(nft list tables | sed -n 's/^table //p')
fi
if [[ -f "$restore" ]]; then
	while IFS='=' read -r s v; do
		if [[ "$(cat "/proc/sys/$s" 2>/dev/null)" != "$v" ]]; then
			echo "$v" >"/proc/sys/$s" && log "restored $s=$v"
		fi
	done < <(sed -n 's/^sysctl=//p' "$restore")
	# Directories the kubelet and containerd create on the host; removed
	# only if they were not there before up.sh.
	for d in /var/log/pods /var/log/containers /run/netns /var/lib/cni /etc/cni /opt/cni; do
		grep -qx "existed=$d" "$restore" || rm -rf "$d"
	done
fi

# The node-capture step's CNI plugin, if the step could not uninstall it:
# the binary its agent copied into this node's CNI bin directory and the
# plugin's per-container records.
rm -f /usr/lib/cni/meshproxy-cni
rm -rf /run/meshproxy/cni
rmdir /run/meshproxy 2>/dev/null || true

# 5. cgroups, leaves first.
for h in /sys/fs/cgroup/*/"$CLUSTER_CGROUP" /sys/fs/cgroup/"$CLUSTER_CGROUP"; do
	[[ -d "$h" ]] || continue
	find "$h" -depth -type d -exec rmdir {} + 2>/dev/null || true
	[[ -d "$h" ]] && log "WARNING: cgroup $h remains"
done

# 6. State.
if [[ -e "$CLUSTER_STATE" || -e "$CLUSTER_RUN" ]]; then
	rm -rf "$CLUSTER_STATE" "$CLUSTER_RUN"
	log "removed $CLUSTER_STATE and $CLUSTER_RUN"
fi
log "down"
