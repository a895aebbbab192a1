#!/usr/bin/env bash
# Build the Kubernetes v1.37.2 components and CoreDNS the test cluster runs
# into the shared cache, ${MESHPROXY_CACHE:-$HOME/.cache/meshproxy}/k8s-v1.37.2/bin,
# outside the repository so a fresh clone on the same machine reuses them.
# Rebuilds only what is missing or older than this module's go.mod/go.sum.
# BUILD_FLAGS adds go build flags (e.g. "-p 4").
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
k8s_version=v1.37.2
cache="${MESHPROXY_CACHE:-$HOME/.cache/meshproxy}"
bin="$cache/k8s-$k8s_version/bin"
GO="${GO:-go}"
read -ra build_flags <<<"${BUILD_FLAGS:-}"
mkdir -p "$bin"

major="${k8s_version#v}"; major="${major%%.*}"
minor="${k8s_version#v*.}"; minor="${minor%%.*}"
ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$k8s_version \
-X k8s.io/component-base/version.gitMajor=$major \
-X k8s.io/component-base/version.gitMinor=$minor \
-X k8s.io/component-base/version.gitTreeState=clean \
-X k8s.io/client-go/pkg/version.gitVersion=$k8s_version \
-X k8s.io/client-go/pkg/version.gitMajor=$major \
-X k8s.io/client-go/pkg/version.gitMinor=$minor"

stale() { # stale BINARY MODDIR: missing, or older than the module that pins it
	[ ! -x "$bin/$1" ] || [ "$2/go.mod" -nt "$bin/$1" ] || [ "$2/go.sum" -nt "$bin/$1" ]
}

want=()
for c in kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl kube-proxy; do
	if stale "$c" "$here"; then want+=("k8s.io/kubernetes/cmd/$c"); fi
done
if [ "${#want[@]}" -gt 0 ]; then
	echo "cluster-tools: building ${want[*]##*/} into $bin"
	(cd "$here" && CGO_ENABLED=0 "$GO" build "${build_flags[@]}" -trimpath -ldflags "$ldflags" -o "$bin/" "${want[@]}")
fi
if stale coredns "$here/coredns"; then
	echo "cluster-tools: building coredns into $bin"
	(cd "$here/coredns" && CGO_ENABLED=0 "$GO" build -trimpath -ldflags '-s -w' -o "$bin/coredns" github.com/coredns/coredns)
fi
echo "cluster-tools: $bin is up to date"
