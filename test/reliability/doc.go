// Package reliability holds meshproxy's multi-process fault tests: the real
// binary as CA and sidecars on loopback, with the CA missing at start or
// dying mid-life, the app down, a peer sidecar killed mid-transfer,
// thousands of connections checked for goroutine and descriptor leaks, and
// forced rotations and a trust-bundle change under load. The SIGTERM drain
// is covered by test/e2e.
package reliability
