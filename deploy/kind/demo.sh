#!/usr/bin/env bash
# meshproxy on a local Kubernetes cluster, end to end:
#   1. a cluster and the meshproxy and demo app images in it;
#   2. a CA made locally with `meshproxy ca init`, stored as Istio's cacerts
#      Secret, and its root as the meshproxy-ca-root ConfigMap;
#   3. the CA (deploy/kubernetes), then the sample workloads injected with
#      `meshproxy inject`;
#   4. a request over mesh mTLS, the identities, a plaintext client refused
#      under STRICT, a meshed client refused by policy, and a forced rotation.
# Run it again to re-deploy onto the same cluster.
#
# What differs between clusters (creating one, loading images, the kubectl
# context) lives in a platform file, so every cluster runs these same steps
# on the same manifests: platform-kind.sh by default (make kind-demo;
# deploy/kind/down.sh deletes it), test/cluster/platform.sh for the
# single-node cluster of the test suite (make cluster-demo).
#
# Environment: DEMO_PLATFORM (the platform file), CLUSTER (default meshproxy,
# kind only), IMAGE (meshproxy:dev), APP_IMAGE (meshproxy-demo-app:dev),
# TIMEOUT for each wait (180s).
set -euo pipefail

IMAGE="${IMAGE:-meshproxy:dev}"
APP_IMAGE="${APP_IMAGE:-meshproxy-demo-app:dev}"
TIMEOUT="${TIMEOUT:-180s}"
TRUST_DOMAIN=cluster.local
# Must match deploy/kind/kind-config.yaml (and contain test/cluster/env.sh's ranges).
POD_CIDR=10.244.0.0/16
SVC_CIDR=10.96.0.0/16

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
die() {
	echo "demo: $*" >&2
	exit 1
}

# The platform defines platform_check_tools, platform_cluster (create or
# reuse), platform_load TARBALL... and k (kubectl for the cluster), and sets
# ctx_hint (how to point kubectl at it, for the closing message).
platform="${DEMO_PLATFORM:-$here/platform-kind.sh}"
# shellcheck source-path=SCRIPTDIR source=platform-kind.sh
. "$platform"

platform_check_tools
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

platform_cluster

step "images $IMAGE and $APP_IMAGE"
IMAGE="$IMAGE" APP_IMAGE="$APP_IMAGE" "$here/images.sh" "$work/images"
platform_load "$work/images/meshproxy.tar" "$work/images/demoapp.tar"

step "local meshproxy binary (for ca init and inject)"
version="$(git -C "$root" describe --tags --always --dirty 2>/dev/null || echo dev)"
(cd "$root" && CGO_ENABLED=0 go build -trimpath -ldflags "-X main.version=$version" -o "$work/meshproxy" ./cmd/meshproxy)
mp="$work/meshproxy"

step "CA keys: Secret istio-system/cacerts and ConfigMap meshproxy-ca-root"
for ns in istio-system demo; do
	k create namespace "$ns" --dry-run=client -o yaml | k apply -f -
done
if k -n istio-system get secret cacerts >/dev/null 2>&1; then
	echo "reusing the existing cacerts Secret (a new CA would strand running sidecars)"
	k -n istio-system get secret cacerts -o jsonpath='{.data.root-cert\.pem}' | base64 --decode >"$work/root-cert.pem"
else
	"$mp" ca init --dir "$work/ca" --trust-domain "$TRUST_DOMAIN"
	k -n istio-system create secret generic cacerts \
		--from-file=root-cert.pem="$work/ca/root-cert.pem" \
		--from-file=ca-cert.pem="$work/ca/ca-cert.pem" \
		--from-file=ca-key.pem="$work/ca/ca-key.pem" \
		--from-file=cert-chain.pem="$work/ca/cert-chain.pem"
	cp "$work/ca/root-cert.pem" "$work/root-cert.pem"
	rm -rf "$work/ca" # the signing key now lives only in the Secret
fi
for ns in istio-system demo; do
	k -n "$ns" create configmap meshproxy-ca-root --from-file=root-cert.pem="$work/root-cert.pem" \
		--dry-run=client -o yaml | k apply -f -
done

step "CA deployment (deploy/kubernetes)"
k apply -k "$root/deploy/kubernetes"
k -n istio-system rollout status deploy/meshproxy-ca --timeout="$TIMEOUT"

step "sample workloads, injected with meshproxy inject"
api_ip="$(k -n default get service kubernetes -o jsonpath='{.spec.clusterIP}')"
dns_ip="$(k -n kube-system get service kube-dns -o jsonpath='{.spec.clusterIP}')"
minor="$(k version -o json | sed -n 's/.*"minor": *"\([0-9]*\).*/\1/p' | tail -n 1)"
native=true
if [[ -n "$minor" && "$minor" -lt 29 ]]; then
	native=false # native sidecars need Kubernetes 1.29
fi
k kustomize "$root/deploy/kubernetes/samples" >"$work/samples.yaml"
# The API server and DNS are not meshed: leave them uncaptured.
"$mp" inject -f "$work/samples.yaml" -o "$work/injected.yaml" \
	--image "$IMAGE" \
	--mesh-cidrs "$POD_CIDR,$SVC_CIDR" \
	--exclude-outbound-cidrs "$api_ip/32,$dns_ip/32" \
	--native-sidecar="$native"
k apply -f "$work/injected.yaml"
for d in echo client other plain; do
	k -n demo rollout status "deploy/$d" --timeout="$TIMEOUT"
done
k -n demo get pods -o wide

step "client -> echo over mesh mTLS"
ok=false
for _ in $(seq 1 20); do
	if k -n demo exec deploy/client -c client -- demoapp get http://echo.demo.svc/; then
		ok=true
		break
	fi
	sleep 3
done
$ok || die "the client's request never succeeded; see: $ctx_hint -n demo logs deploy/client -c meshproxy"

step "the client's identity (meshproxy identity, in its sidecar)"
k -n demo exec deploy/client -c meshproxy -- meshproxy identity

step "echo's live connections (meshproxy peers)"
k -n demo exec deploy/echo -c meshproxy -- meshproxy peers

step "a pod without a sidecar is refused under STRICT"
if k -n demo exec deploy/plain -c plain -- demoapp get http://echo.demo.svc/; then
	die "echo accepted a plaintext request under STRICT"
fi
echo "refused, as it should be"

step "a meshed pod with another identity is refused by echo's AuthorizationPolicy"
if k -n demo exec deploy/other -c other -- demoapp get http://echo.demo.svc/; then
	die "echo accepted spiffe://$TRUST_DOMAIN/ns/demo/sa/other despite its AuthorizationPolicy"
fi
echo "refused, as it should be"

step "forced rotation of the client's certificate"
serial() {
	local json serials
	json="$(k -n demo exec deploy/client -c meshproxy -- meshproxy identity -o json)"
	serials="$(sed -n 's/.*"serial": *"\([^"]*\)".*/\1/p' <<<"$json")"
	echo "${serials%%$'\n'*}"
}
before="$(serial)"
# The sidecar image has no shell or HTTP client; the admin API listens on the pod's
# loopback, which the application container shares.
k -n demo exec deploy/client -c client -- demoapp get -timeout 30s -method POST http://127.0.0.1:15000/rotate
echo
after="$(serial)"
echo "serial before: $before"
echo "serial after:  $after"
[[ -n "$after" && "$after" != "$before" ]] || die "the serial did not change after POST /rotate"
k -n demo exec deploy/client -c client -- demoapp get http://echo.demo.svc/

step "done"
cat <<MSG
The demo is running. Try:
  $ctx_hint -n demo logs deploy/client -c client -f
  $ctx_hint -n demo exec deploy/echo -c meshproxy -- meshproxy peers
  $ctx_hint -n istio-system logs deploy/meshproxy-ca
$platform_down_hint
MSG
