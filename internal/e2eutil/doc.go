// Package e2eutil runs the real meshproxy binary for multi-process tests
// (test/e2e, test/reliability): it builds the binary once, starts and stops
// its processes, waits for their readiness, and reads what a sidecar exposes
// about itself — metrics, goroutines (pprof), open descriptors (/proc).
// Everything binds to 127.0.0.1.
package e2eutil
