// Package spireint tests meshproxy's SPIFFE Workload API identity source
// against a real SPIRE server and agent: SVIDs issued by SPIRE, mutual TLS
// between two SPIRE identities, live rotation, and two `meshproxy run`
// sidecars moving bytes with SPIRE identities.
//
// The SPIRE binaries are built from the separate module in test/spire (so
// SPIRE's dependency graph stays out of meshproxy's go.mod), without the
// plugins the tests never configure, by scripts/test-tools.sh into
// ~/.cache/meshproxy/test-tools when missing or stale (package
// internal/testtools), where later runs and checkouts reuse them; set
// MESHPROXY_SPIRE_BIN to a directory holding prebuilt spire-server and
// spire-agent binaries to skip that. The first build takes minutes. The package has only tests; `go test -short` skips them.
package spireint
