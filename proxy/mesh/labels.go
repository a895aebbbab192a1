package mesh

// Connection directions (the direction label and PeerInfo.Direction).
const (
	DirInbound  = "inbound"
	DirOutbound = "outbound"
	DirGateway  = "gateway"
)

// Connection modes (the mode label and PeerInfo.Mode).
const (
	ModeMTLS        = "mtls"        // mesh mTLS terminated (inbound) or originated (outbound, gateway)
	ModeTLS         = "tls"         // the app's own TLS, passed through
	ModePlaintext   = "plaintext"   // plaintext, passed through (gateway: to a destination a DestinationRule marks DISABLE)
	ModePassthrough = "passthrough" // not inspected (inbound DISABLE, outbound outside the mesh, gateway PASSTHROUGH)
	ModeUnknown     = "unknown"     // refused before the mode was known
)
