// Package admin serves the sidecar's and gateway's local HTTP endpoints: the
// admin API (GET /identity, /peers, /config, POST /rotate, /debug/pprof/ —
// bound to 127.0.0.1:15000 by the caller) and the readiness probe
// (/healthz/ready). The Prometheus endpoint is metrics.Handler, shared with
// the CA. Responses and errors are JSON; methods are checked.
package admin
