package gateway

import "testing"

// A server host "NS/HOST" lets only NS's VirtualServices take HOST. A
// VirtualService bound to a server through one of its hosts must not catch,
// by a wider SNI match or a TCP route, the names another namespace owns on
// the same server.
func TestRoutesStayWithinTheServerHostsOfTheirNamespace(t *testing.T) {
	gw := func(mode string) string {
		return `apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw, namespace: istio-system}
spec:
  servers:
  - port: {number: 443, name: tls, protocol: TLS}
    hosts: ["alpha/a.example.com", "billing/b.example.com"]
    tls: {mode: ` + mode + `}
---
`
	}
	vs := func(ns, created, hosts, body string) string {
		return "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: vs, namespace: " + ns +
			", creationTimestamp: \"" + created + "\"}\nspec:\n  hosts: " + hosts + "\n  gateways: [istio-system/gw]\n" + body
	}
	tlsRoute := func(sni, dest string) string {
		return "  tls:\n  - match: [{sniHosts: [\"" + sni + "\"]}]\n    route: [{destination: {host: " + dest + ", port: {number: 1}}}]\n"
	}
	tcpRoute := func(dest string) string {
		return "  tcp:\n  - route: [{destination: {host: " + dest + ", port: {number: 1}}}]\n"
	}
	const older, newer = "2020-01-01T00:00:00Z", "2024-01-01T00:00:00Z"
	tests := []struct {
		name string
		yaml string
		want map[string]string // SNI → the route's VirtualService ("" none)
	}{
		{"PASSTHROUGH: a wider sniHosts does not reach another namespace's host",
			gw("PASSTHROUGH") + vs("alpha", older, `["*.example.com"]`, tlsRoute("*.example.com", "evil.alpha")) + "\n---\n" +
				vs("billing", newer, `["b.example.com"]`, tlsRoute("b.example.com", "pay.billing")),
			map[string]string{"a.example.com": "alpha/vs", "b.example.com": "billing/vs"}},
		// An sniHosts outside the service's own hosts is refused by Istio's
		// validation (TestLoadConfigRejectsWithFileAndField).
		{"SIMPLE: a TCP route serves only its namespace's hosts",
			gw("SIMPLE, credentialName: cred") + vs("alpha", older, `["a.example.com"]`, tcpRoute("evil.alpha")) + "\n---\n" +
				vs("billing", newer, `["b.example.com"]`, tcpRoute("pay.billing")),
			map[string]string{"a.example.com": "alpha/vs", "b.example.com": "billing/vs"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cfg, err := loadYAML(t, tc.yaml)
			if err != nil {
				t.Fatal(err)
			}
			for sni, want := range tc.want {
				s := cfg.ports[443].server(sni)
				if s == nil {
					t.Fatalf("no server for %s", sni)
				}
				got := ""
				if r := s.route(443, sni); r != nil {
					got = r.name
				}
				if got != want {
					t.Errorf("SNI %s routed by %q, want %q", sni, got, want)
				}
			}
		})
	}
}
