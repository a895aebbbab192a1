// Package proxy is meshproxy's sidecar data plane: the transparent and
// explicit listeners, inbound sniffing and STRICT / PERMISSIVE / DISABLE
// enforcement, mesh mTLS termination and origination, L4 authorization, and
// the forwarding loop with half-close, idle timeout and graceful drain.
//
// A Proxy consumes two things and nothing else: a tlsmgr.Source (the
// workload's SVID and trust bundles; rotation happens behind it) and a
// PolicySource (the current policy.Snapshot, swapped on reload). Original
// destinations of redirected connections come from an injected function
// (WithOriginalDst), so the package knows nothing of nftables or eBPF.
//
// Flows (ports as in docs/CONTRACT.md, "Ports"):
//
//	inbound  :15006 or LISTEN=APP  sniff → mesh mTLS: terminate, authorize peer, plaintext to app
//	                               → app TLS / plaintext: authorize (no peer), pass through untouched
//	outbound :15001 or LISTEN=DEST  DestinationRule / --mesh-cidrs → mesh mTLS to the original destination
//	                               → otherwise pass through untouched (explicit outbound is always mTLS)
//
// Every refusal closes the connection, is counted in a bounded metric label
// and logged with the reason.
package proxy
