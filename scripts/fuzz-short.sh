#!/usr/bin/env bash
# fuzz-short.sh runs every fuzz target of meshproxy for a short while
# (FUZZTIME each, default 7s; about 90s in all with the builds): the CI smoke run of
# `make fuzz-short`. The seed corpora (testdata/fuzz/FuzzXxx) also run as
# plain tests in `go test`; this explores beyond them. A failure leaves the
# crashing input in the package's testdata/fuzz/FuzzXxx/: commit it with the
# fix so it stays a regression test.
#
# Each package's test binary is built once with fuzzing instrumentation and
# run per target, which saves a link per target over `go test -fuzz`.
set -euo pipefail

cd "$(dirname "$0")/.."
root=$PWD
GO=${GO:-go}
FUZZTIME=${FUZZTIME:-7s}
module=$($GO list -m)
cache=$($GO env GOCACHE)/fuzz
bin=$(mktemp -d)
trap 'rm -rf "$bin"' EXIT

# package: targets — most exposed input first
targets=(
	"proxy/sniff: FuzzSniff"                                  # first bytes of every inbound connection
	"ca: FuzzSign FuzzBearerToken"                            # CSRs and authorization headers of CA callers
	"ca/authn: FuzzJWT FuzzJWTClaims FuzzJWKS FuzzTokensFile" # bearer JWTs, key sets, the tokens file
	"policy: FuzzLoad FuzzReadLabelsFile"                     # --config-dir YAML, the downward-API labels file
)

start=$(date +%s)
n=0
for line in "${targets[@]}"; do
	pkg=${line%%:*}
	test=$bin/$(echo "$pkg" | tr / _).test
	$GO test -c -fuzz=. -o "$test" "./$pkg"
	for name in ${line#*:}; do
		echo "== $name ($pkg, $FUZZTIME)"
		# A crash is reported with "Failing input written to" and fails at
		# once. Anything else that ends the run non-zero (Go's coordinator
		# losing a worker on a loaded machine: "context deadline exceeded")
		# is retried once, then fails too. No minimizing: Go's coordinator
		# minimizes every new interesting input, and here that stalled
		# whole runs at 0 execs/s (FuzzReadLabelsFile failed a CI run so,
		# twice in a row); without it the same 20 s runs never stalled and
		# made 40x the execs. A crash input is still written, unminimized.
		for attempt in 1 2; do
			out=$bin/out
			if (cd "$root/$pkg" && "$test" -test.run '^$' -test.fuzz "^${name}\$" -test.fuzztime "$FUZZTIME" \
				-test.fuzzminimizetime 0 -test.fuzzcachedir "$cache/$module/$pkg") >"$out" 2>&1; then
				cat "$out"
				break
			fi
			cat "$out"
			if grep -q "Failing input written to" "$out" || ((attempt == 2)); then
				echo "fuzz-short: $name failed" >&2
				exit 1
			fi
			echo "fuzz-short: $name ended without a crash input (the fuzzing engine's own failure); retrying once" >&2
		done
		n=$((n + 1))
	done
done
echo "fuzz-short: $n targets in $(( $(date +%s) - start ))s"
