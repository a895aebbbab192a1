// Package metrics defines every Prometheus metric meshproxy exports (names in
// docs/CONTRACT.md, prefix meshproxy_) on one registry. Label values are bounded:
// never a peer identity or an address.
package metrics

import (
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// Registry holds all meshproxy metrics plus the Go and process collectors.
var Registry = prometheus.NewRegistry()

const ns = "meshproxy"

// Sidecar identity.
var (
	CertExpiry = newGauge("cert_expiry_timestamp_seconds",
		"Unix time at which the workload certificate expires.")
	CertNotBefore = newGauge("cert_not_before_timestamp_seconds",
		"Unix time from which the workload certificate is valid; with the expiry it gives the lifetime.")
	CertRotations = newCounterVec("cert_rotations_total",
		"Certificate renewals and reloads by result (success, failure).", "result")
)

// Data plane.
var (
	Handshakes = newCounterVec("handshakes_total",
		"Mesh TLS handshakes by direction (inbound, outbound) and result (ok or the refusal reason).",
		"direction", "result")
	HandshakeDuration = register(prometheus.NewHistogram(prometheus.HistogramOpts{
		Namespace: ns, Name: "handshake_duration_seconds",
		Help:    "Duration of mesh TLS handshakes.",
		Buckets: []float64{.0005, .001, .002, .005, .01, .025, .05, .1, .25, .5, 1, 5},
	}))
	Connections = newCounterVec("connections_total",
		"Proxied connections by direction, mode (mtls, tls, plaintext, passthrough) and decision (allow or the refusal reason).",
		"direction", "mode", "decision")
	ConnectionsActive = register(prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Namespace: ns, Name: "connections_active",
		Help: "Connections open now, by direction.",
	}, []string{"direction"}))
	MeshConnections = register(prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Namespace: ns, Name: "mesh_connections_active",
		Help: "Mesh mTLS connections open now, by direction and transport: pooled (HBONE, many app connections as streams) or direct (one app connection each).",
	}, []string{"direction", "transport"}))
	Bytes = newCounterVec("bytes_total",
		"Bytes forwarded by direction (inbound, outbound).", "direction")
	PolicyDenials = newCounterVec("policy_denials_total",
		"Connections refused by policy, by reason.", "reason")
	ConfigReloads = newCounterVec("config_reloads_total",
		"Policy and certificate file reloads by kind and result (success, failure).", "kind", "result")
	AdminRefused = newCounterVec("admin_requests_refused_total",
		"Admin API requests refused, by reason (foreign_host, cross_origin, rotate_throttled).", "reason")
	// AppProbes counts the application probes the health port ran for the
	// kubelet (rewritten by inject); probe is livez, readyz or startupz.
	AppProbes = newCounterVec("app_probes_total",
		"Application probes run on the health port for the kubelet, by probe (livez, readyz, startupz) and result (success, failure, timeout).",
		"probe", "result")
)

// Trust-domain federation (meshproxy run --federate-with). The trust domain
// label comes from the command line, never from the wire.
var (
	FederationFetches = newCounterVec("federation_bundle_fetches_total",
		"Fetches of federated trust bundles from bundle endpoints, by trust domain and result (success, failure).",
		"trust_domain", "result")
	FederationLastSuccess = register(prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Namespace: ns, Name: "federation_bundle_last_success_timestamp_seconds",
		Help: "Unix time of the last successful fetch of a federated trust bundle, by trust domain.",
	}, []string{"trust_domain"}))
)

// Certificate authority.
var (
	CACertsIssued = register(prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: ns, Name: "ca_certs_issued_total",
		Help: "Workload certificates issued by the CA.",
	}))
	CACSRErrors = newCounterVec("ca_csr_errors_total",
		"CSR requests the CA refused, by reason.", "reason")
	CAAuthThrottled = register(prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: ns, Name: "ca_auth_throttled_total",
		Help: "CA requests refused with ResourceExhausted because their source failed authentication too often.",
	}))
	CAConnectionsRefused = register(prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: ns, Name: "ca_connections_refused_total",
		Help: "Connections the CA closed at once because --max-connections were open.",
	}))
	CARootExpiry = newGauge("ca_root_expiry_timestamp_seconds",
		"Unix time at which the earliest-expiring root in the trust bundle expires.")
	CAChainExpiry = newGauge("ca_chain_expiry_timestamp_seconds",
		"Unix time at which the CA's signing chain expires.")
)

// Ingress gateway (meshproxy gateway). Listener and route labels are config
// names (the Gateway port, the VirtualService namespace/name), never client
// addresses or SNI values from the wire.
var (
	GatewayConnections = newCounterVec("gateway_connections_total",
		"Gateway connections by listener (port), route (VirtualService namespace/name, \"none\" before one is chosen) and result (ok or the refusal reason).",
		"listener", "route", "result")
	GatewayConnectionsActive = register(prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Namespace: ns, Name: "gateway_connections_active",
		Help: "Gateway connections open now, by listener (port).",
	}, []string{"listener"}))
	GatewayBytes = newCounterVec("gateway_bytes_total",
		"Bytes the gateway forwarded, both ways, by listener (port).", "listener")
	GatewayCredentialExpiry = register(prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Namespace: ns, Name: "gateway_credential_expiry_timestamp_seconds",
		Help: "Unix time at which the server certificate of a gateway credential (credentialName) expires.",
	}, []string{"credential"}))
)

// Istio configuration documents (policy and gateway loaders). The policy
// label is a configured AuthorizationPolicy's namespace/name, never a peer.
var (
	ConfigDocuments = register(prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Namespace: ns, Name: "config_documents",
		Help: "Istio documents of the last load, by kind and result (applied, warned, dry_run, rejected).",
	}, []string{"kind", "result"}))
	AuthzDryRun = newCounterVec("authz_dry_run_total",
		"Connections evaluated by istio.io/dry-run AuthorizationPolicies (never enforced), by policy and the result it would have had (allow, deny).",
		"policy", "result")
)

func init() {
	Registry.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
}

func register[C prometheus.Collector](c C) C {
	Registry.MustRegister(c)
	return c
}

func newGauge(name, help string) prometheus.Gauge {
	return register(prometheus.NewGauge(prometheus.GaugeOpts{Namespace: ns, Name: name, Help: help}))
}

func newCounterVec(name, help string, labels ...string) *prometheus.CounterVec {
	return register(prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: name, Help: help}, labels))
}
