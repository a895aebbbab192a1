#!/usr/bin/env bash
# Build images and import them into the test cluster's containerd:
#   pause      the pod sandbox image (test/cluster/image/pause);
#   coredns    the cluster DNS, from the CoreDNS make cluster-tools built;
#   meshproxy  and demoapp: deploy/kind/images.sh, the demo's images;
#   meshproxy-iptables  meshproxy:dev-iptables, meshproxy plus this host's
#              iptables-nft tools and their libraries, for --mode iptables
#              (deploy/Dockerfile's iptables target, without a base image).
# Usage: images.sh NAME... (default: all five).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=env.sh
. "$here/env.sh"
out="$CLUSTER_STATE/images"
mkdir -p "$out/bin"
ctr() { command ctr --address "$CLUSTER_CONTAINERD_SOCK" --namespace k8s.io "$@"; }
tool="$out/bin/image"
if [[ ! -x "$tool" ]]; then
	(cd "$here/image" && CGO_ENABLED=0 go build -trimpath -o "$tool" .)
fi

names=("$@")
((${#names[@]} > 0)) || names=(pause coredns meshproxy demoapp meshproxy-iptables)
demo_built=false
for n in "${names[@]}"; do
	case "$n" in
	pause)
		(cd "$here/image" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$out/bin/pause" ./pause)
		"$tool" -tag "$CLUSTER_PAUSE_IMAGE" -out "$out/pause.tar" -user 65535:65535 -user-name pause \
			-add "$out/bin/pause=/pause" -entrypoint /pause
		ctr images import "$out/pause.tar" >/dev/null
		;;
	coredns)
		"$tool" -tag meshproxy-coredns:dev -out "$out/coredns.tar" -user 65532:65532 -user-name coredns \
			-add "$K8S_BIN/coredns=/coredns" -entrypoint /coredns
		ctr images import "$out/coredns.tar" >/dev/null
		;;
	meshproxy | demoapp)
		if ! $demo_built; then
			"$here/../../deploy/kind/images.sh" "$out"
			demo_built=true
		fi
		ctr images import "$out/$n.tar" >/dev/null
		;;
	meshproxy-iptables)
		if ! $demo_built; then
			"$here/../../deploy/kind/images.sh" "$out"
			demo_built=true
		fi
		multi="$(readlink -f "$(command -v iptables-nft-restore)")"
		adds=(-add "$out/bin/meshproxy=/usr/local/bin/meshproxy")
		for name in iptables-nft-restore iptables-nft-save ip6tables-nft-restore ip6tables-nft-save; do
			adds+=(-add "$multi=/usr/local/bin/$name") # one multi-call binary, run by name
		done
		while read -r lib; do
			adds+=(-add "$(readlink -f "$lib")=$lib")
		done < <(ldd "$multi" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}')
		for m in /usr/lib/x86_64-linux-gnu/xtables/*.so /usr/lib/*/xtables/*.so; do
			[[ -f "$m" ]] && adds+=(-add "$(readlink -f "$m")=$m")
		done
		"$tool" -tag meshproxy:dev-iptables -out "$out/meshproxy-iptables.tar" -user 1337:1337 -user-name meshproxy \
			"${adds[@]}" -entrypoint /usr/local/bin/meshproxy
		ctr images import "$out/meshproxy-iptables.tar" >/dev/null
		;;
	*)
		echo "images: unknown image $n (pause, coredns, meshproxy, demoapp, meshproxy-iptables)" >&2
		exit 1
		;;
	esac
	echo "images: $n imported"
done
