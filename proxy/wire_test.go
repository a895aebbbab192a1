package proxy

import (
	"testing"
	"time"

	"github.com/meshproxy/meshproxy/proxy/mesh"
)

// TestInboundWireTable runs every client kind against every mTLS mode,
// through an explicit inbound listener and through a transparent one whose
// original destination is the app.
func TestInboundWireTable(t *testing.T) {
	m := newMesh(t)
	server := m.identity(t, echoID)
	web := m.identity(t, webID)
	// Silent clients wait out the detect timeout, so keep theirs short; every
	// other client gets a long one, so a slow ClientHello on a loaded machine
	// is never mistaken for silence.
	const silentDetect, detect = 300 * time.Millisecond, 30 * time.Second

	type client struct {
		name string
		app  func(*testing.T) *app
		dial func(testing.TB, string) error
		mode string // the mode label when inspected (PERMISSIVE / STRICT)
	}
	echoApp := func(t *testing.T) *app { return startApp(t, echo) }
	meshMTLS := client{"mesh mTLS", echoApp, meshClient(web), mesh.ModeMTLS}
	appTLS := client{"app TLS", func(t *testing.T) *app { return startApp(t, tlsApp(m, t)) }, appTLSClient(m), mesh.ModeTLS}
	plain := client{"plaintext", echoApp, plaintextClient, mesh.ModePlaintext}
	silent := client{"server speaks first", func(t *testing.T) *app { return startApp(t, banner) }, silentClient, mesh.ModePlaintext}
	// Under DISABLE a mesh client's hello must reach the app as it was sent.
	meshRaw := client{"mesh mTLS", echoApp, meshHelloVerbatim(web), mesh.ModePassthrough}

	tests := []struct {
		mode     string
		client   client
		ok       bool
		label    string // mode label counted
		decision string
	}{
		{"STRICT", meshMTLS, true, mesh.ModeMTLS, DecisionAllow},
		{"STRICT", appTLS, false, mesh.ModeTLS, DecisionMTLSRequired},
		{"STRICT", plain, false, mesh.ModePlaintext, DecisionMTLSRequired},
		{"STRICT", silent, false, mesh.ModePlaintext, DecisionMTLSRequired},
		{"PERMISSIVE", meshMTLS, true, mesh.ModeMTLS, DecisionAllow},
		{"PERMISSIVE", appTLS, true, mesh.ModeTLS, DecisionAllow},
		{"PERMISSIVE", plain, true, mesh.ModePlaintext, DecisionAllow},
		{"PERMISSIVE", silent, true, mesh.ModePlaintext, DecisionAllow},
		{"DISABLE", meshRaw, true, mesh.ModePassthrough, DecisionAllow},
		{"DISABLE", appTLS, true, mesh.ModePassthrough, DecisionAllow},
		{"DISABLE", plain, true, mesh.ModePassthrough, DecisionAllow},
		{"DISABLE", silent, true, mesh.ModePassthrough, DecisionAllow},
	}
	for _, listener := range []string{"explicit", "transparent"} {
		for _, tt := range tests {
			t.Run(listener+"/"+tt.mode+"/"+tt.client.name, func(t *testing.T) {
				a := tt.client.app(t)
				st, _ := policyStore(t, peerAuth(tt.mode))
				opt := WithInboundExplicit("127.0.0.1:0", a.addr())
				if listener == "transparent" {
					opt = WithInboundTransparent("127.0.0.1:0")
				}
				d := detect
				if tt.client.name == silent.name {
					d = silentDetect
				}
				p := startProxy(t, server, st, opt, WithOriginalDst(fixedDst(a.addr())), WithDetectTimeout(d))
				before := connections(mesh.DirInbound, tt.label, tt.decision)

				err := tt.client.dial(t, p.Addrs()[0].String())
				if tt.ok && err != nil {
					t.Fatalf("%s client through %s: %v", tt.client.name, tt.mode, err)
				}
				if !tt.ok && err == nil {
					t.Fatalf("%s client got through a %s port", tt.client.name, tt.mode)
				}
				eventually(t, "connection counted", func() bool {
					return connections(mesh.DirInbound, tt.label, tt.decision) == before+1
				})
			})
		}
	}
}
