package tlsmgr

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"

	"github.com/meshproxy/meshproxy/internal/testpki"
)

// verifyRecord remembers, for the last VerifyConnection call of one side,
// whether the handshake was a resumption and what verification said.
type verifyRecord struct {
	mu      sync.Mutex
	calls   int
	resumed bool
	err     error
}

func (v *verifyRecord) wrap(cfg *tls.Config) {
	inner := cfg.VerifyConnection
	cfg.VerifyConnection = func(cs tls.ConnectionState) error {
		err := inner(cs)
		v.mu.Lock()
		v.calls++
		v.resumed, v.err = cs.DidResume, err
		v.mu.Unlock()
		return err
	}
}

func (v *verifyRecord) last() (calls int, resumed bool, err error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.calls, v.resumed, v.err
}

// TestResumedSessionIsReverified proves that a TLS 1.3 session resumed from
// a ticket cannot skip peer verification: after the side that verifies
// stops accepting the peer (authorizer or trust bundle change), resuming
// the old session fails. A server's bundle change also voids its tickets
// (they are bound to the source's generation), so there the refusal comes
// from the full handshake that follows.
func TestResumedSessionIsReverified(t *testing.T) {
	type env struct {
		ca, other      *testpki.CA
		server, client *Static
		allowClient    atomic.Bool
	}
	tests := []struct {
		name     string
		revoke   func(t *testing.T, e *env)
		verifier string // which side must refuse: "server" or "client"
		resumed  bool   // whether the refused handshake is a resumption
	}{
		{"server authorizer no longer allows the client", func(_ *testing.T, e *env) { e.allowClient.Store(false) }, "server", true},
		{"server trust bundle no longer holds the client's root", func(t *testing.T, e *env) {
			svid, _ := e.server.GetX509SVID()
			e.server.Set(svid, e.other.Bundle())
		}, "server", false},
		{"client trust bundle no longer holds the server's root", func(t *testing.T, e *env) {
			svid, _ := e.client.GetX509SVID()
			e.client.Set(svid, e.other.Bundle())
		}, "client", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := &env{ca: testpki.New(t, "cluster.local"), other: testpki.New(t, "cluster.local")}
			e.server = NewStatic(e.ca.Issue(t, serverID, time.Hour), e.ca.Bundle())
			e.client = NewStatic(e.ca.Issue(t, clientID, time.Hour), e.ca.Bundle())
			e.allowClient.Store(true)
			allowed := authorizeID(clientID)
			scfg := ServerConfig(e.server, func(id spiffeid.ID, chains [][]*x509.Certificate) error {
				if !e.allowClient.Load() {
					return errors.New("client no longer allowed")
				}
				return allowed(id, chains)
			})
			var srvRec, cliRec verifyRecord
			srvRec.wrap(scfg)
			server := startServer(t, scfg)

			ccfg := ClientConfig(e.client, authorizeID(serverID))
			ccfg.ClientSessionCache = tls.NewLRUClientSessionCache(8)
			ccfg.ServerName = OutboundSNI("server.default.svc.cluster.local", 8080)
			cliRec.wrap(ccfg)

			// 1. Full handshake; reading the byte also processes the ticket.
			cs, err := server.roundTrip(ccfg)
			if err != nil {
				t.Fatalf("first handshake: %v", err)
			}
			if cs.DidResume {
				t.Fatal("first handshake claims resumption")
			}
			// 2. Resumption works while trust is unchanged, so the refusal
			// below cannot come from a failed resumption attempt.
			cs, err = server.roundTrip(ccfg)
			if err != nil {
				t.Fatalf("resumed handshake before the change: %v", err)
			}
			if !cs.DidResume {
				t.Fatal("second handshake did not resume: the test would pass vacuously")
			}
			if _, resumed, _ := srvRec.last(); !resumed {
				t.Fatal("server did not see the resumption")
			}

			// 3. Trust changes; the resumed handshake must fail.
			tt.revoke(t, e)
			rec := &srvRec
			if tt.verifier == "client" {
				rec = &cliRec
			}
			callsBefore, _, _ := rec.last()
			if _, err := server.roundTrip(ccfg); err == nil {
				t.Fatal("resumed session accepted after the peer stopped being trusted")
			}
			// The server side records asynchronously; wait for its record.
			deadline := time.Now().Add(30 * time.Second)
			calls, resumed, verr := rec.last()
			for calls == callsBefore && time.Now().Before(deadline) {
				time.Sleep(10 * time.Millisecond)
				calls, resumed, verr = rec.last()
			}
			if calls == callsBefore {
				t.Fatalf("%s never ran VerifyConnection on the refused handshake", tt.verifier)
			}
			if resumed != tt.resumed {
				t.Fatalf("%s refused a handshake with resumed = %v, want %v", tt.verifier, resumed, tt.resumed)
			}
			if verr == nil {
				t.Fatalf("%s's verification passed; the handshake failed for another reason", tt.verifier)
			}
		})
	}
}

func TestHandshakeAcceptsOnlyAuthorizedSPIFFEPeers(t *testing.T) {
	ca := testpki.New(t, "cluster.local")
	other := testpki.New(t, "cluster.local")
	otherTD := testpki.New(t, "example.org")
	server := NewStatic(ca.Issue(t, serverID, time.Hour), ca.Bundle(), otherTD.Bundle())
	srv := startServer(t, ServerConfig(server, tlsconfig.AuthorizeMemberOf(spiffeid.RequireTrustDomainFromString("cluster.local"))))

	tests := []struct {
		name    string
		client  func(t *testing.T) *tls.Config
		wantErr bool
	}{
		{"peer of our trust domain", func(t *testing.T) *tls.Config {
			return ClientConfig(NewStatic(ca.Issue(t, clientID, time.Hour), ca.Bundle()), authorizeID(serverID))
		}, false},
		{"peer signed by an unknown ca", func(t *testing.T) *tls.Config {
			return ClientConfig(NewStatic(other.Issue(t, clientID, time.Hour), ca.Bundle()), authorizeID(serverID))
		}, true},
		{"trusted peer of another trust domain not authorized", func(t *testing.T) *tls.Config {
			return ClientConfig(NewStatic(otherTD.Issue(t, "spiffe://example.org/ns/a/sa/b", time.Hour), ca.Bundle()), authorizeID(serverID))
		}, true},
		{"client without certificate", func(t *testing.T) *tls.Config {
			cfg := ClientConfig(NewStatic(ca.Issue(t, clientID, time.Hour), ca.Bundle()), authorizeID(serverID))
			cfg.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &tls.Certificate{}, nil }
			return cfg
		}, true},
		{"client expecting another server id", func(t *testing.T) *tls.Config {
			return ClientConfig(NewStatic(ca.Issue(t, clientID, time.Hour), ca.Bundle()), authorizeID("spiffe://cluster.local/ns/default/sa/db"))
		}, true},
		{"server name absent from the certificate is ignored", func(t *testing.T) *tls.Config {
			cfg := ClientConfig(NewStatic(ca.Issue(t, clientID, time.Hour), ca.Bundle()), authorizeID(serverID))
			cfg.ServerName = "server.default.svc"
			return cfg
		}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cs, err := srv.roundTrip(tt.client(t))
			if tt.wantErr != (err != nil) {
				t.Fatalf("round trip err = %v, want error: %v", err, tt.wantErr)
			}
			if err == nil {
				if cs.Version != tls.VersionTLS13 || cs.NegotiatedProtocol != ALPNIstio {
					t.Fatalf("version %x alpn %q, want TLS 1.3 and %q", cs.Version, cs.NegotiatedProtocol, ALPNIstio)
				}
				if id, err := PeerID(cs); err != nil || id.String() != serverID {
					t.Fatalf("PeerID = %v, %v", id, err)
				}
			}
		})
	}
}

func TestClientSendsIstioOutboundSNI(t *testing.T) {
	ca := testpki.New(t, "cluster.local")
	server := NewStatic(ca.Issue(t, serverID, time.Hour), ca.Bundle())
	client := NewStatic(ca.Issue(t, clientID, time.Hour), ca.Bundle())
	got := make(chan string, 1)
	scfg := ServerConfig(server, authorizeID(clientID))
	scfg.GetConfigForClient = func(h *tls.ClientHelloInfo) (*tls.Config, error) {
		select {
		case got <- h.ServerName:
		default:
		}
		return nil, nil
	}
	srv := startServer(t, scfg)
	ccfg := ClientConfig(client, authorizeID(serverID))
	ccfg.ServerName = OutboundSNI("reviews.default.svc.cluster.local", 9080)
	if _, err := srv.roundTrip(ccfg); err != nil {
		t.Fatal(err)
	}
	const want = "outbound_.9080_._.reviews.default.svc.cluster.local"
	if sni := <-got; sni != want {
		t.Fatalf("server saw SNI %q, want %q", sni, want)
	}
	if !strings.HasPrefix(ccfg.ServerName, "outbound_.") {
		t.Fatal("ServerName changed")
	}
}
