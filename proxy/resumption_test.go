package proxy

import (
	"context"
	"crypto/tls"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshproxy/meshproxy/internal/testpki"
	"github.com/meshproxy/meshproxy/tlsmgr"
)

// ratingsID is a second client workload, signed by another root.
const ratingsID = "spiffe://cluster.local/ns/default/sa/ratings"

// handshakeLog records every inbound mesh handshake the server verified.
type handshakeLog struct {
	mu  sync.Mutex
	all []handshakeEntry
}

type handshakeEntry struct {
	peer    string
	resumed bool
	err     error
}

func (l *handshakeLog) wrap(cfg *tls.Config) {
	inner := cfg.VerifyConnection
	cfg.VerifyConnection = func(cs tls.ConnectionState) error {
		err := inner(cs)
		e := handshakeEntry{resumed: cs.DidResume, err: err}
		if id, idErr := tlsmgr.PeerID(cs); idErr == nil {
			e.peer = id.String()
		}
		l.mu.Lock()
		l.all = append(l.all, e)
		l.mu.Unlock()
		return err
	}
}

// since returns the entries recorded after the first n.
func (l *handshakeLog) since(n int) []handshakeEntry {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]handshakeEntry(nil), l.all[n:]...)
}

func (l *handshakeLog) len() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.all)
}

// bundleOf is one trust domain's bundle holding every CA's root.
func bundleOf(cas ...*testpki.CA) *x509bundle.Bundle {
	b := x509bundle.New(spiffeid.RequireTrustDomainFromString("cluster.local"))
	for _, ca := range cas {
		for _, root := range ca.Bundle().X509Authorities() {
			b.AddX509Authority(root)
		}
	}
	return b
}

// TestResumedSessionsNeverOutliveATrustOrPolicyChange drives real outbound
// and inbound sidecars on loopback. While nothing changes, the clients'
// sidecars resume their TLS sessions. After the server drops a client's
// root, or an AuthorizationPolicy starts denying it, that client's next
// connection is refused although it holds a ticket, and the client still
// allowed keeps working (with a full handshake first: tickets are bound to
// the bundle and policy generations, then it resumes again).
func TestResumedSessionsNeverOutliveATrustOrPolicyChange(t *testing.T) {
	tests := []struct {
		name     string
		change   func(t *testing.T, server *tlsmgr.Static, rootA *testpki.CA, policyDir string)
		isPolicy bool // the change is a policy file: wait for its reload
	}{
		{"server trust bundle drops the ratings root", func(t *testing.T, server *tlsmgr.Static, rootA *testpki.CA, _ string) {
			svid, err := server.GetX509SVID()
			if err != nil {
				t.Fatal(err)
			}
			server.Set(svid, bundleOf(rootA))
		}, false},
		{"authorization policy now denies ratings", func(t *testing.T, _ *tlsmgr.Static, _ *testpki.CA, policyDir string) {
			writePolicy(t, policyDir, peerAuth("STRICT")+`---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: no-ratings
  namespace: default
spec:
  action: DENY
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/ratings"]
`)
		}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rootA, rootB := testpki.New(t, "cluster.local"), testpki.New(t, "cluster.local")
			both := bundleOf(rootA, rootB)
			server := tlsmgr.NewStatic(rootA.Issue(t, echoID, time.Hour), both)
			web := tlsmgr.NewStatic(rootA.Issue(t, webID, time.Hour), both)
			ratings := tlsmgr.NewStatic(rootB.Issue(t, ratingsID, time.Hour), both)

			a := startApp(t, echo)
			st, dir := policyStore(t, peerAuth("STRICT"))
			sp := New(server, st, WithLogger(quietLog), WithInboundExplicit("127.0.0.1:0", a.addr()))
			var log handshakeLog
			log.wrap(sp.serverTLS) // before Start: no handshake can race with it
			if err := sp.Start(context.Background()); err != nil {
				t.Fatalf("start server proxy: %v", err)
			}
			t.Cleanup(func() {
				ctx, cancel := context.WithTimeout(context.Background(), clientWait)
				defer cancel()
				_ = sp.Shutdown(ctx)
			})
			serverAddr := sp.Addrs()[0].String()
			entry := map[string]string{}
			for id, src := range map[string]*tlsmgr.Static{webID: web, ratingsID: ratings} {
				cst, _ := policyStore(t, "")
				c := startProxy(t, src, cst, WithOutboundExplicit("127.0.0.1:0", serverAddr, mustID(t, echoID)))
				entry[id] = c.Addrs()[0].String()
			}

			// connect makes one connection from id's sidecar and returns
			// the server's handshakes of it and the round trip's error.
			connect := func(id string) ([]handshakeEntry, error) {
				before := log.len()
				c := dial(t, entry[id])
				err := roundTrip(c, "hello from "+id)
				c.Close()
				if err == nil {
					return log.since(before), nil
				}
				// A refusal: wait until the server has recorded it.
				eventually(t, "the server's handshake record", func() bool { return log.len() > before })
				return log.since(before), err
			}
			expect := func(id string, wantResumed bool) {
				t.Helper()
				hs, err := connect(id)
				if err != nil {
					t.Fatalf("%s: round trip: %v", id, err)
				}
				if len(hs) != 1 || hs[0].peer != id || hs[0].err != nil {
					t.Fatalf("%s: server handshakes %+v, want one verified handshake of %s", id, hs, id)
				}
				if hs[0].resumed != wantResumed {
					t.Fatalf("%s: handshake resumed = %v, want %v", id, hs[0].resumed, wantResumed)
				}
			}

			// 1. Nothing changes: the first handshake is full, the next ones resume.
			for _, id := range []string{webID, ratingsID} {
				expect(id, false)
				expect(id, true)
				expect(id, true)
			}

			// 2. The change; wait for a policy reload to be in force.
			gen := st.Current().Generation()
			tt.change(t, server, rootA, dir)
			if tt.isPolicy {
				eventually(t, "the new policy", func() bool { return st.Current().Generation() != gen })
			}

			// 3. ratings holds a ticket but is refused.
			hs, err := connect(ratingsID)
			if err == nil {
				t.Fatal("ratings still gets through after the change")
			}
			for _, h := range hs {
				if h.resumed && h.err == nil {
					t.Fatalf("the server resumed and accepted ratings' old session: %+v", hs)
				}
			}
			// 4. web still works: a full handshake (its ticket was bound to
			// the old generation), then resumption again.
			expect(webID, false)
			expect(webID, true)
			// And ratings stays refused.
			if _, err := connect(ratingsID); err == nil {
				t.Fatal("ratings gets through on a second try")
			}
		})
	}
}
