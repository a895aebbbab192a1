// Package tlsmgr holds a workload's identity: it obtains X.509-SVIDs (from a
// CA by CSR, from mounted files, or from a SPIFFE Workload API), renews them
// before they expire, keeps the trust bundles, and builds crypto/tls configs
// that verify peers by SPIFFE ID. The data plane sees only the Source
// interface and the config builders, never files, CA clients or rotation.
//
// Sources:
//   - Rotator: CSRs to an Issuer (the gRPC client in tlsmgr/caclient, or a
//     CA in-process), fresh in-memory P-256 key per renewal, renewal at half
//     life ± jitter, backoff while the CA is down, roots from the CA merged
//     with an optional bundle file.
//   - RootWatch (WatchRoots): wraps a Rotator and renews promptly when the
//     CA's published roots file changes (a root rotation).
//   - FileSource: mounted PEM files, reloaded on change (Kubernetes secret
//     volumes included); a bad reload keeps the last good identity.
//   - WorkloadAPISource: SVIDs and bundles streamed from a SPIFFE Workload
//     API (a SPIRE agent); a bad update keeps the current identity.
//   - Federated (NewFederated): wraps any Source and adds the trust bundles
//     of foreign trust domains, fetched from their SPIFFE bundle endpoints
//     (FederationEndpoint) and refreshed at their refresh hint.
//   - Static: a fixed identity for tests, tools and the demo.
//
// Inspect is the client side of `meshproxy inspect`: a handshake with a peer
// whose chain is verified by SPIFFE rules against given roots.
//
// Every source swaps immutable snapshots through an atomic pointer, so
// Certificate costs a pointer load, and announces changes through Notifier.
// ServerConfig and ClientConfig verify the peer in VerifyConnection, which
// crypto/tls runs on resumed handshakes too: a session ticket never outlives
// a trust bundle or authorization change.
package tlsmgr
