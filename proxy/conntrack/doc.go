// Package conntrack keeps the connections a data plane has accepted, from
// accept to close: the accept loop, admission under a connection limit,
// per-connection cancellation and socket teardown, the GET /peers view, and
// draining on shutdown. The sidecar (package proxy) and the ingress gateway
// share it; what a connection is used for stays with them.
package conntrack
