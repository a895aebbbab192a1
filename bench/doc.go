// Package bench holds meshproxy's performance measurements.
//
// This package's benchmarks (go test -bench . ./bench) price the mesh mTLS
// handshake: a full handshake through tlsmgr.ServerConfig/ClientConfig
// against bare crypto/tls with the same chain (P-256 root → intermediate →
// leaf, TLS 1.3), and resumed (session ticket) handshakes against full ones,
// in the same run so the ratios can be read off.
//
// The peer comparison with HAProxy and stunnel lives in bench/harness and
// runs with `go run ./bench/cmd/compare` (make bench-compare); recorded runs
// and what limits meshproxy are in bench/RESULTS.md.
package bench
