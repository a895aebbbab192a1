#!/usr/bin/env bash
# Build the Kubernetes v1.37.2 components, CoreDNS and cert-manager's
# controller the test cluster runs into the shared cache,
# ${MESHPROXY_CACHE:-$HOME/.cache/meshproxy}/k8s-v1.37.2/bin, outside the
# repository so a fresh clone on the same machine reuses them. Rebuilds only
# when the module, flags or Go change (scripts/cached-build.sh). The three
# are one module and one go build: the Kubernetes libraries, gRPC and the
# standard library they share compile once. BUILD_FLAGS adds go build flags
# (e.g. "-p 4").
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
outs+=("$bin/coredns" "$bin/cert-manager-controller")
pkgs+=(./coredns ./cert-manager-controller)
CGO_ENABLED=0 GO="$GO" "$build" cluster-tools "$here" "${outs[*]}" -- \
	"${build_flags[@]}" -trimpath -ldflags "$ldflags" -o "$bin/" "${pkgs[@]}"
echo "cluster-tools: $bin is up to date"
