// Package proxytest has the test servers the sidecar's and the gateway's
// tests put behind a proxy: a loopback app that runs a handler per
// connection, and handlers such as Echo.
package proxytest
