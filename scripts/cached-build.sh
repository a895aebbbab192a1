#!/usr/bin/env bash
# cached-build.sh NAME MODDIR "OUTPUT..." -- GO-BUILD-ARGUMENTS...
#
# Builds test tools (Kubernetes, CoreDNS, cert-manager, SPIRE, step-ca) into
# a cache outside the checkout, and skips the build when the outputs came
# from the same inputs: the stamp NAME.stamp beside the first output holds a
# digest of MODDIR's go.mod, go.sum, *.go and */*.go, the go build arguments,
# CGO_ENABLED and GOFLAGS, `go version` and CACHED_BUILD_EXTRA (what else
# shaped the sources, such as scripts/trim-module.sh's arguments). File
# contents, not times: a fresh clone (as in CI) has new file times but the
# same module, and must not rebuild.
# GO selects the go command (default go).
set -euo pipefail
if [ "$#" -lt 4 ] || [ "$4" != "--" ]; then
	echo "usage: $0 NAME MODDIR \"OUTPUT...\" -- GO-BUILD-ARGUMENTS..." >&2
	exit 2
fi
name=$1 moddir=$2
read -ra outputs <<<"$3"
shift 4
GO="${GO:-go}"
stamp="$(dirname "${outputs[0]}")/$name.stamp"
mkdir -p "$(dirname "${outputs[0]}")"
# One build of NAME at a time (tests of several packages may ask at once);
# the second finds the first's outputs up to date.
exec 9>"$stamp.lock"
flock 9

want=$(
	cd "$moddir"
	{
		for f in go.mod go.sum *.go */*.go; do
			[ -e "$f" ] && { printf '%s\n' "$f"; cat "$f"; }
		done
		printf 'args:'; printf ' %q' "$@"; printf '\n'
		printf 'CGO_ENABLED=%s GOFLAGS=%s\n' "${CGO_ENABLED:-}" "${GOFLAGS:-}"
		if [ -n "${CACHED_BUILD_EXTRA:-}" ]; then printf 'extra:%s\n' "$CACHED_BUILD_EXTRA"; fi
		"$GO" version
	} | sha256sum | cut -d' ' -f1
)
fresh=1
for o in "${outputs[@]}"; do
	[ -x "$o" ] || fresh=0
done
if [ "$fresh" = 1 ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
	echo "cached-build: $name is up to date in $(dirname "${outputs[0]}")"
	exit 0
fi
echo "cached-build: building $name into $(dirname "${outputs[0]}")"
rm -f "$stamp"
(cd "$moddir" && "$GO" build "$@")
for o in "${outputs[@]}"; do
	if [ ! -x "$o" ]; then
		echo "cached-build: $name: the build did not produce $o" >&2
		exit 1
	fi
done
printf '%s\n' "$want" >"$stamp"
