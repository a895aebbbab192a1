// Package spireint tests meshproxy's SPIFFE Workload API identity source
// against a real SPIRE server and agent: SVIDs issued by SPIRE, mutual TLS
// between two SPIRE identities, live rotation, and two `meshproxy run`
// sidecars moving bytes with SPIRE identities.
//
// The SPIRE binaries are built from the separate module in test/spire (so
// SPIRE's dependency graph stays out of meshproxy's go.mod) once per
// version, into a directory under os.TempDir() that later runs reuse; set
// MESHPROXY_SPIRE_BIN to a directory holding prebuilt spire-server and
// spire-agent binaries to skip the build. The first build takes several
// minutes. The package has only tests; `go test -short` skips them.
package spireint
