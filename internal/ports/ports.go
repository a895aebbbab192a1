// Package ports is the one table of Istio's port numbers and proxy uid that
// meshproxy keeps (docs/CONTRACT.md, "Ports"), so existing firewall rules,
// probes and capture exemptions fit. Every package that needs one of these
// numbers takes it from here.
package ports

import (
	"net"
	"strconv"
)

// Istio's ports, as meshproxy uses them.
const (
	// Admin is the sidecar's admin API; it binds to loopback only.
	Admin = 15000
	// Outbound is the transparent outbound capture listener.
	Outbound = 15001
	// Inbound is the transparent inbound capture listener.
	Inbound = 15006
	// HBONE is the HTTP/2 CONNECT over mTLS listener.
	HBONE = 15008
	// CA is the CA's gRPC API (meshproxy ca serve).
	CA = 15012
	// CAMetrics is the CA's Prometheus endpoint.
	CAMetrics = 15014
	// Metrics is the sidecar's and gateway's Prometheus endpoint.
	Metrics = 15020
	// Health is the readiness endpoint, /healthz/ready.
	Health = 15021
	// EnvoyStats is Envoy's Prometheus port; meshproxy does not serve it,
	// but capture leaves it alone so Istio-era scrapers do not loop.
	EnvoyStats = 15090
)

// ProxyUID and ProxyGID own the proxy's own traffic, which capture never
// redirects.
const (
	ProxyUID = 1337
	ProxyGID = 1337
)

// HostPort is the address HOST:PORT.
func HostPort(host string, port uint16) string {
	return net.JoinHostPort(host, strconv.Itoa(int(port)))
}

// Any is the listen address ":PORT" on all addresses.
func Any(port uint16) string { return HostPort("", port) }

// Loopback is the listen address "127.0.0.1:PORT".
func Loopback(port uint16) string { return HostPort("127.0.0.1", port) }

// Proxy lists the sidecar's own ports: inbound traffic to them is never
// captured (admin, capture listeners, HBONE, metrics, health, Envoy stats).
func Proxy() []uint16 {
	return []uint16{Admin, Outbound, Inbound, HBONE, Metrics, Health, EnvoyStats}
}
