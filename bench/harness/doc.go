// Package harness compares meshproxy with HAProxy and stunnel as mTLS
// sidecar pairs on loopback.
//
// One run generates a PKI (P-256 root → intermediate → a client and a server
// leaf with SPIFFE IDs) in a temporary directory, starts an echo app of ours
// (bench/cmd/echo) and, for each peer, a pair of proxies:
//
//	load generator → client proxy (plaintext in) ══ mTLS 1.3 ══▶ server proxy → echo app
//
// and drives every pair with the same load generator: new connections per
// request, requests on kept connections, bulk transfer, and idle connections
// held while the proxies' resident memory is read from /proc. Runs are
// interleaved across peers and repeated; the report takes the median.
//
// Every process it starts is stopped when the run ends, fails or is
// cancelled, and is killed by the kernel (PR_SET_PDEATHSIG) if the harness
// itself dies. Only 127.0.0.1 is used.
package harness
