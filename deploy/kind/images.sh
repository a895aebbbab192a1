#!/usr/bin/env bash
# Build the demo's two images as docker-archive tarballs, with no Docker
# daemon and no registry (test/cluster/image writes them):
#   OUTDIR/meshproxy.tar  $IMAGE: the static meshproxy binary as
#                         deploy/Dockerfile describes it (user 1337:1337);
#   OUTDIR/demoapp.tar    $APP_IMAGE: deploy/demoapp, the sample workloads.
# Both the kind demo (kind load image-archive) and the local test cluster
# (ctr images import) load these files.
#
# Usage: images.sh OUTDIR. Environment: IMAGE (meshproxy:dev), APP_IMAGE
# (meshproxy-demo-app:dev), GOARCH (the Go default), VERSION.
set -euo pipefail

out="${1:?usage: images.sh OUTDIR}"
IMAGE="${IMAGE:-meshproxy:dev}"
APP_IMAGE="${APP_IMAGE:-meshproxy-demo-app:dev}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
arch="${GOARCH:-$(go env GOARCH)}"
version="${VERSION:-$(git -C "$root" describe --tags --always --dirty 2>/dev/null || echo dev)}"
mkdir -p "$out/bin"

# Pods run linux binaries whatever the workstation is.
(cd "$root" && CGO_ENABLED=0 GOOS=linux GOARCH="$arch" go build -trimpath -tags noinject,nocloudca \
	-ldflags "-s -w -X main.version=$version" -o "$out/bin/meshproxy" ./cmd/meshproxy)
(cd "$root" && CGO_ENABLED=0 GOOS=linux GOARCH="$arch" go build -trimpath -ldflags "-s -w" \
	-o "$out/bin/demoapp" ./deploy/demoapp)
(cd "$root/test/cluster/image" && CGO_ENABLED=0 GOOS='' GOARCH='' go build -o "$out/bin/image" .)

certs=()
if [[ -f /etc/ssl/certs/ca-certificates.crt ]]; then
	certs=(-add /etc/ssl/certs/ca-certificates.crt=/etc/ssl/certs/ca-certificates.crt)
fi
"$out/bin/image" -tag "$IMAGE" -out "$out/meshproxy.tar" -arch "$arch" \
	-user 1337:1337 -user-name meshproxy "${certs[@]}" \
	-add "$out/bin/meshproxy=/usr/local/bin/meshproxy" -entrypoint /usr/local/bin/meshproxy \
	-expose 15001,15006,15008,15012,15014,15020,15021
"$out/bin/image" -tag "$APP_IMAGE" -out "$out/demoapp.tar" -arch "$arch" \
	-user 65532:65532 -user-name demoapp \
	-add "$out/bin/demoapp=/usr/local/bin/demoapp" -entrypoint /usr/local/bin/demoapp
echo "images: $IMAGE in $out/meshproxy.tar, $APP_IMAGE in $out/demoapp.tar"
