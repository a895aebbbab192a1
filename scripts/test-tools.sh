#!/usr/bin/env bash
# test-tools.sh DIR — build the real SPIRE server and agent (test/spire) and
# step-ca (test/stepca) that the tests run into DIR (`make tools`), each only
# when its module, flags, plugin list or Go changed (scripts/cached-build.sh).
#
# Both are built from their released modules without the plugins the tests
# never configure (scripts/trim-module.sh): SPIRE keeps the sql DataStore, the
# memory and disk KeyManagers, join_token node attestation, the unix workload
# attestor, the disk UpstreamAuthority and uniqueid (test/spireint's
# configuration); step-ca keeps softkms and softcas (ca/stepca's): 1,076
# packages instead of 2,342 for SPIRE, 703 instead of 985 for step-ca (SPIRE
# measured 303 CPU-seconds on a cold build cache). They serve a few test
# requests, so they are compiled without optimisations (-N -l).
# GO selects the go command (default go).
set -euo pipefail
if [ "$#" -ne 1 ]; then
	echo "usage: $0 DIR" >&2
	exit 2
fi
root="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$1"
tools="$(cd "$1" && pwd)"
export GO="${GO:-go}"
# One run at a time (test packages without MESHPROXY_*_BIN ask in parallel):
# each run rewrites the trimmed sources in DIR; the second finds the binaries
# up to date.
exec 9>"$tools/.test-tools.lock"
flock 9
flags=(-gcflags 'all=-N -l' -ldflags '-s -w')

# catalog file: the built-in plugins dropped (one per line in SPIRE's lists)
attestors="awsiid azuremsi gcpiit httpchallenge k8spsat sshpop tpmdevid x509pop"
spire_trim=(
	"pkg/agent/catalog/nodeattestor.go: $attestors"
	"pkg/agent/catalog/svidstore.go: awssecretsmanager gcpsecretmanager"
	"pkg/agent/catalog/workloadattestor.go: docker k8s systemd windows"
	"pkg/server/catalog/bundlepublisher.go: awss3 gcpcloudstorage awsrolesanywhere k8sconfigmap"
	"pkg/server/catalog/keymanager.go: awskms gcpkms azurekeyvault"
	"pkg/server/catalog/nodeattestor.go: $attestors"
	"pkg/server/catalog/notifier.go: gcsbundle k8sbundle"
	"pkg/server/catalog/upstreamauthority.go: awssecret awspca gcpcas vault spireplugin certmanager ejbca"
)
# step-ca's main imports every KMS and CA service for their side effects.
stepca_trim=(
	"cmd/step-ca/main.go: awskms azurekms cloudkms pkcs11 sshagentkms tpmkms yubikey cloudcas stepcas vaultcas"
)

# tool NAME MODDIR MODULE "OUTPUTS" CGO TRIM... -- GO-BUILD-ARGUMENTS...
tool() {
	local name=$1 moddir=$root/$2 module=$3 outputs=$4 cgo=$5
	shift 5
	local trim=()
	while [ "$1" != -- ]; do trim+=("$1"); shift; done
	shift
	local src=$tools/$name-src
	"$root/scripts/trim-module.sh" "$moddir" "$module" "$src" "${trim[@]}"
	CGO_ENABLED=$cgo CACHED_BUILD_EXTRA="$(printf '%s;' "${trim[@]}")$(sha256sum <"$root/scripts/trim-module.sh")" \
		"$root/scripts/cached-build.sh" "$name" "$moddir" "$outputs" -- -modfile "$src/go.mod" "$@"
	rm -rf "$src"
}

# SPIRE's sqlite DataStore needs cgo.
tool spire test/spire github.com/spiffe/spire "$tools/spire-server $tools/spire-agent" 1 "${spire_trim[@]}" -- \
	"${flags[@]}" -o "$tools/" github.com/spiffe/spire/cmd/spire-server github.com/spiffe/spire/cmd/spire-agent
tool step-ca test/stepca github.com/smallstep/certificates "$tools/step-ca" 0 "${stepca_trim[@]}" -- \
	"${flags[@]}" -o "$tools/step-ca" github.com/smallstep/certificates/cmd/step-ca
