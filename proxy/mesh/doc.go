// Package mesh is the floor that meshproxy's two data planes, the sidecar
// (package proxy) and the ingress gateway (package gateway), both stand on:
// mesh mTLS configs built from a tlsmgr.Source (ClientConfigs,
// ServerConfig), originating mesh mTLS on a dialed connection (Originate),
// the bounded handshake result labels (HandshakeResult), the direction and
// mode labels, the trust-domain and address helpers, the settings and
// options both data planes share (Settings, Option), and the effective
// configuration the admin API shows (Config).
//
// Neither data plane imports the other; each imports this package.
package mesh
