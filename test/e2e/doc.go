// Package e2e holds multi-process end-to-end tests: they build the real
// meshproxy binary and run it as users do, on loopback.
package e2e
