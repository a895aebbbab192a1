package tlsmgr

import (
	"crypto/x509"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshproxy/meshproxy/internal/testpki"
)

// TestSessionTicketsAreBoundToGenerations: a ticket issued before the
// server's source or its WithSessionGeneration generation changed is not
// resumed (a full handshake follows and succeeds), and a client's session
// cache forgets its sessions when the client's own generation changes.
func TestSessionTicketsAreBoundToGenerations(t *testing.T) {
	tests := []struct {
		name   string
		change func(server, client *Static, policyGen *atomic.Uint64)
	}{
		{"server policy generation", func(_, _ *Static, g *atomic.Uint64) { g.Add(1) }},
		{"server svid or bundle", func(server, _ *Static, _ *atomic.Uint64) {
			svid, _ := server.GetX509SVID()
			b, _ := server.GetX509BundleForTrustDomain(svid.ID.TrustDomain())
			server.Set(svid, b)
		}},
		{"client svid or bundle", func(_, client *Static, _ *atomic.Uint64) {
			svid, _ := client.GetX509SVID()
			b, _ := client.GetX509BundleForTrustDomain(svid.ID.TrustDomain())
			client.Set(svid, b)
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ca := testpki.New(t, "cluster.local")
			server := NewStatic(ca.Issue(t, serverID, time.Hour), ca.Bundle())
			client := NewStatic(ca.Issue(t, clientID, time.Hour), ca.Bundle())
			var policyGen atomic.Uint64
			srv := startServer(t, ServerConfig(server, authorizeID(clientID), WithSessionGeneration(policyGen.Load)))
			ccfg := ClientConfig(client, authorizeID(serverID))
			ccfg.ClientSessionCache = NewClientSessionCache(client, 8)

			for i, want := range []bool{false, true} {
				cs, err := srv.roundTrip(ccfg)
				if err != nil {
					t.Fatalf("handshake %d: %v", i, err)
				}
				if cs.DidResume != want {
					t.Fatalf("handshake %d: resumed %v, want %v", i, cs.DidResume, want)
				}
			}
			tt.change(server, client, &policyGen)
			for i, want := range []bool{false, true} {
				cs, err := srv.roundTrip(ccfg)
				if err != nil {
					t.Fatalf("handshake %d after the change: %v", i, err)
				}
				if cs.DidResume != want {
					t.Fatalf("handshake %d after the change: resumed %v, want %v", i, cs.DidResume, want)
				}
			}
		})
	}
}

// countingSource counts the bundle lookups of chain verification.
type countingSource struct {
	*Static
	lookups atomic.Int64
}

func (c *countingSource) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	c.lookups.Add(1)
	return c.Static.GetX509BundleForTrustDomain(td)
}

// TestVerifiedChainsAreCachedPerGenerationAndValidity: a chain seen again
// skips verification while the source's generation and the chain's
// validity window hold; the authorizer runs every time.
func TestVerifiedChainsAreCachedPerGenerationAndValidity(t *testing.T) {
	ca := testpki.New(t, "cluster.local")
	src := &countingSource{Static: NewStatic(ca.Issue(t, serverID, time.Hour), ca.Bundle())}
	peer := ca.Issue(t, clientID, time.Hour).Certificates
	other := ca.Issue(t, clientID, time.Hour).Certificates
	var authzCalls atomic.Int64
	deny := atomic.Bool{}
	authz := func(id spiffeid.ID, chains [][]*x509.Certificate) error {
		authzCalls.Add(1)
		if len(chains) == 0 || len(chains[0]) < 2 || id.String() != clientID {
			return errors.New("no verified chain")
		}
		if deny.Load() {
			return errors.New("denied")
		}
		return nil
	}
	vc := newVerifyCache(2)
	check := func(step string, certs []*x509.Certificate, wantLookups int64, wantErr bool) {
		t.Helper()
		before := authzCalls.Load()
		id, err := vc.verifyPeer(src, authz, certs)
		if (err != nil) != wantErr {
			t.Fatalf("%s: err = %v, want error %v", step, err, wantErr)
		}
		if err == nil && id.String() != clientID {
			t.Fatalf("%s: id %s", step, id)
		}
		if got := src.lookups.Load(); got != wantLookups {
			t.Fatalf("%s: %d chain verifications so far, want %d", step, got, wantLookups)
		}
		if authzCalls.Load() != before+1 {
			t.Fatalf("%s: the authorizer did not run", step)
		}
	}
	check("first sight", peer, 1, false)
	check("seen again", peer, 1, false)
	deny.Store(true)
	check("cached chain, authorizer denies", peer, 1, true)
	deny.Store(false)
	check("another chain", other, 2, false)

	svid, _ := src.GetX509SVID()
	src.Set(svid, ca.Bundle())
	check("after a generation change", peer, 3, false)
	check("cached under the new generation", peer, 3, false)

	// Outside the validity window the entry is not used.
	vc.mu.Lock()
	for _, e := range vc.m {
		e.notAfter = time.Now().Add(-time.Second)
	}
	vc.mu.Unlock()
	check("past the chain's validity", peer, 4, false)

	// Bounded: a third chain empties the two-entry cache.
	check("third chain", ca.Issue(t, clientID, time.Hour).Certificates, 5, false)
	vc.mu.Lock()
	n := len(vc.m)
	vc.mu.Unlock()
	if n > 2 {
		t.Fatalf("cache holds %d entries, bound is 2", n)
	}

	// A chain that does not verify is never cached.
	stranger := testpki.New(t, "cluster.local").Issue(t, clientID, time.Hour).Certificates
	if _, err := vc.verifyPeer(src, authz, stranger); err == nil {
		t.Fatal("chain of an unknown root verified")
	}
	if _, err := vc.verifyPeer(src, authz, stranger); err == nil {
		t.Fatal("chain of an unknown root verified on the second try")
	}
}

// TestCachedVerificationHandsTheAuthorizerThisHandshakesChain: on a cache
// hit the authorizer gets the chain presented now, ending at the anchor.
func TestCachedVerificationHandsTheAuthorizerThisHandshakesChain(t *testing.T) {
	ca := testpki.New(t, "cluster.local")
	src := NewStatic(ca.Issue(t, serverID, time.Hour), ca.Bundle())
	peer := ca.Issue(t, clientID, time.Hour).Certificates
	again := make([]*x509.Certificate, len(peer))
	for i, c := range peer {
		p, err := x509.ParseCertificate(c.Raw)
		if err != nil {
			t.Fatal(err)
		}
		again[i] = p
	}
	var got [][]*x509.Certificate
	authz := func(_ spiffeid.ID, chains [][]*x509.Certificate) error { got = chains; return nil }
	vc := newVerifyCache(8)
	if _, err := vc.verifyPeer(src, authz, peer); err != nil {
		t.Fatal(err)
	}
	first := got
	if _, err := vc.verifyPeer(src, authz, again); err != nil {
		t.Fatal(err)
	}
	if len(got) != len(first) || len(got[0]) != len(first[0]) {
		t.Fatalf("cached chains %d×%d, verified %d×%d", len(got), len(got[0]), len(first), len(first[0]))
	}
	if got[0][0] != again[0] {
		t.Fatal("the authorizer got another handshake's leaf")
	}
	root := first[0][len(first[0])-1]
	if got[0][len(got[0])-1] != root || !root.IsCA {
		t.Fatal("the cached chain does not end at the trust anchor")
	}
}
