#!/usr/bin/env bash
# Build the Kubernetes v1.37.2 components and CoreDNS the test cluster runs
# into the shared cache, ${MESHPROXY_CACHE:-$HOME/.cache/meshproxy}/k8s-v1.37.2/bin,
# outside the repository so a fresh clone on the same machine reuses them.
# Rebuilds only when the modules, flags or Go change (scripts/cached-build.sh).
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

build="$here/../../../scripts/cached-build.sh"
outs=()
pkgs=()
for c in kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl kube-proxy; do
	outs+=("$bin/$c")
	pkgs+=("k8s.io/kubernetes/cmd/$c")
done
# The two builds run side by side: the end of each (linking) leaves a core
# idle that the other uses.
CGO_ENABLED=0 GO="$GO" "$build" kubernetes "$here" "${outs[*]}" -- \
	"${build_flags[@]}" -trimpath -ldflags "$ldflags" -o "$bin/" "${pkgs[@]}" &
k8s=$!
# CoreDNS answers a handful of names for a few pods: it is built without
# optimisations (-N -l), which takes a third less CPU to compile.
status=0
CGO_ENABLED=0 GO="$GO" "$build" coredns "$here/coredns" "$bin/coredns" -- \
	-trimpath -gcflags "all=-N -l" -ldflags "-s -w" -o "$bin/coredns" . || status=$?
wait "$k8s" || status=$?
[ "$status" = 0 ] || exit "$status"
echo "cluster-tools: $bin is up to date"
