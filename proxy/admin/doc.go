// Package admin serves the sidecar's local HTTP endpoints: the admin API
// (GET /identity, /peers, /config, POST /rotate, /debug/pprof/ — bound to
// 127.0.0.1:15000 by the caller), the Prometheus metrics (/stats/prometheus
// and /metrics) and the readiness probe (/healthz/ready). Responses and
// errors are JSON; methods are checked.
package admin
