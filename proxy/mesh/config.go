package mesh

import "encoding/json"

// Config is a data plane's effective configuration, as GET /config shows it.
type Config struct {
	Generation  uint64          `json:"generation"`
	Mode        string          `json:"mode"` // the workload's mTLS mode before port-level overrides
	TrustDomain string          `json:"trust_domain,omitempty"`
	MeshCIDRs   []string        `json:"mesh_cidrs"`
	Listeners   []ListenerInfo  `json:"listeners"`
	Policy      json.RawMessage `json:"policy"`
}

// ListenerInfo describes one listener.
type ListenerInfo struct {
	Name       string `json:"name"`
	Kind       string `json:"kind"` // inbound, outbound, inbound-explicit, outbound-explicit, gateway-tls, gateway-tcp
	Listen     string `json:"listen"`
	Address    string `json:"address,omitempty"` // bound address once started
	Target     string `json:"target,omitempty"`  // app (inbound-explicit) or destination (outbound-explicit)
	ExpectedID string `json:"expected_id,omitempty"`
	Mode       string `json:"mode,omitempty"` // inbound-explicit: the mTLS mode of the app port
}
