// Package stepcatest runs a real step-ca server for tests: it builds the
// step-ca binary from the pinned tools module in test/stepca when missing or
// stale (scripts/test-tools.sh, into ~/.cache/meshproxy/test-tools, which
// later runs and checkouts reuse; package internal/testtools), initializes
// a CA with a throwaway root and intermediate and a JWK provisioner whose
// X.509 template issues SPIFFE certificates, and starts it on loopback.
//
// Set MESHPROXY_STEPCA_BIN to a prebuilt step-ca binary to skip the build.
// The first build takes minutes on a small machine.
package stepcatest
