package proxy

import "github.com/meshproxy/meshproxy/proxy/conntrack"

// PeerInfo describes one open, established connection, as GET /peers shows it.
// BytesIn counts bytes received from the downstream side (the connecting
// peer or app), BytesOut bytes sent back to it.
type PeerInfo = conntrack.PeerInfo

// tracked is one accepted connection from accept to close.
type tracked = conntrack.Conn
