package proxy

import (
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/meshproxy/meshproxy/internal/testpki"
	"github.com/meshproxy/meshproxy/proxy/mesh"
	"github.com/meshproxy/meshproxy/tlsmgr"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// allResults are the bounded values of handshakes_total{result}.
var allResults = []string{mesh.ResultOK, mesh.ResultNoClientCert, mesh.ResultExpired, mesh.ResultNotYetValid, mesh.ResultUnknownAuthority,
	mesh.ResultWrongTrustDomain, mesh.ResultNotSPIFFE, mesh.ResultCAAsLeaf, mesh.ResultWrongIdentity, mesh.ResultTLSVersion,
	mesh.ResultBadHello, mesh.ResultTimeout, mesh.ResultOther}

// inboundHandshakes sums handshakes_total{direction="inbound"} over every result.
func inboundHandshakes() float64 {
	var n float64
	for _, r := range allResults {
		n += handshakes(mesh.DirInbound, r)
	}
	return n
}

// expectClosedByProxy reads from c until the proxy ends the connection; the
// client's own deadline firing means the proxy left it open.
func expectClosedByProxy(c net.Conn) error {
	_ = c.SetReadDeadline(time.Now().Add(clientWait))
	_, err := io.Copy(io.Discard, c)
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return errors.New("the proxy left the connection open")
	}
	return nil
}

// sendAndExpectClose writes b (a refused write is fine: the proxy may close
// first) and waits for the proxy to close the connection.
func sendAndExpectClose(b []byte) func(testing.TB, string) error {
	return func(t testing.TB, addr string) error {
		c := dial(t, addr)
		_, _ = c.Write(b)
		return expectClosedByProxy(c)
	}
}

// tlsClientRefused runs a TLS client with cfg and succeeds if the proxy
// refuses it: the handshake or the first round trip fails.
func tlsClientRefused(cfg *tls.Config) func(testing.TB, string) error {
	return func(t testing.TB, addr string) error {
		tc := tls.Client(dial(t, addr), cfg)
		if err := tc.Handshake(); err != nil {
			return nil
		}
		// TLS 1.3: the client finishes before the server has judged its
		// certificate; the verdict arrives as an alert on the first read.
		if err := roundTrip(tc, "ping\n"); err == nil {
			return errors.New("refused client got a round trip through")
		}
		return nil
	}
}

// clientPresenting is a mesh client config presenting svid and trusting the mesh.
func clientPresenting(m *testMesh, svid *x509svid.SVID) *tls.Config {
	return meshClientConfig(tlsmgr.NewStatic(svid, m.ca.Bundle()))
}

func TestStrictRefusalsAreCountedExactlyAndSpareValidClients(t *testing.T) {
	m := newMesh(t)
	web := m.identity(t, webID)
	now := time.Now()
	foreignRoot := testpki.New(t, "cluster.local") // same trust domain name, another root
	otherTD := testpki.New(t, "other.example")
	rng := rand.New(rand.NewChaCha8([32]byte{8}))

	bigALPN := []string{tlsmgr.ALPNIstio}
	for i := range 100 {
		bigALPN = append(bigALPN, fmt.Sprintf("%0200d", i))
	}
	oversized := meshClientConfig(web)
	oversized.NextProtos = bigALPN
	tls12 := meshClientConfig(web)
	tls12.MinVersion, tls12.MaxVersion = tls.VersionTLS12, tls.VersionTLS12
	noCert := &tls.Config{InsecureSkipVerify: true, NextProtos: []string{tlsmgr.ALPNIstio}}

	// Random bytes that cannot start a TLS record, and random bytes framed
	// as a TLS handshake record.
	plainGarbage := make([]byte, 4096)
	for i := range plainGarbage {
		plainGarbage[i] = byte(rng.Uint32())
	}
	plainGarbage[0] = 0x17 + byte(rng.IntN(200)) // anything but 0x16
	tlsGarbage := []byte{0x16, 0x03, 0x01, 0x02, 0x00}
	for range 512 {
		tlsGarbage = append(tlsGarbage, byte(rng.Uint32()))
	}

	tests := []struct {
		name      string
		client    func(testing.TB, string) error
		result    string // handshakes_total{inbound,result}; "" if no handshake is counted
		mode      string // connections_total{inbound,mode,decision}
		decision  string
		peerCheck bool // one of the refusals of a peer certificate, which must be told apart
	}{
		{"random plaintext garbage", sendAndExpectClose(plainGarbage), "", mesh.ModePlaintext, DecisionMTLSRequired, false},
		{"random bytes framed as a TLS record", sendAndExpectClose(tlsGarbage), mesh.ResultBadHello, mesh.ModeUnknown, DecisionHandshakeFailed, false},
		{"oversized ClientHello", tlsClientRefused(oversized), mesh.ResultBadHello, mesh.ModeUnknown, DecisionHandshakeFailed, false},
		{"the app's own TLS on a STRICT port", appTLSClientRefused(), "", mesh.ModeTLS, DecisionMTLSRequired, false},
		{"TLS 1.2-only mesh client", tlsClientRefused(tls12), mesh.ResultTLSVersion, mesh.ModeMTLS, DecisionHandshakeFailed, false},
		{"mesh client without a certificate", tlsClientRefused(noCert), mesh.ResultNoClientCert, mesh.ModeMTLS, DecisionHandshakeFailed, false},
		{"expired certificate", tlsClientRefused(clientPresenting(m, m.ca.IssueLeaf(t, testpki.Leaf{ID: webID, NotBefore: now.Add(-3 * time.Hour), TTL: time.Hour}))),
			mesh.ResultExpired, mesh.ModeMTLS, DecisionHandshakeFailed, true},
		{"certificate not yet valid", tlsClientRefused(clientPresenting(m, m.ca.IssueLeaf(t, testpki.Leaf{ID: webID, NotBefore: now.Add(time.Hour)}))),
			mesh.ResultNotYetValid, mesh.ModeMTLS, DecisionHandshakeFailed, true},
		{"certificate from another trust domain", tlsClientRefused(clientPresenting(m, otherTD.Issue(t, "spiffe://other.example/ns/frontend/sa/web", time.Hour))),
			mesh.ResultWrongTrustDomain, mesh.ModeMTLS, DecisionHandshakeFailed, true},
		{"CA certificate used as a leaf", tlsClientRefused(clientPresenting(m, m.ca.IssueLeaf(t, testpki.Leaf{ID: webID, IsCA: true}))),
			mesh.ResultCAAsLeaf, mesh.ModeMTLS, DecisionHandshakeFailed, true},
		{"certificate chained to another root", tlsClientRefused(clientPresenting(m, foreignRoot.Issue(t, webID, time.Hour))),
			mesh.ResultUnknownAuthority, mesh.ModeMTLS, DecisionHandshakeFailed, true},
		{"certificate without a SPIFFE ID", tlsClientRefused(clientPresenting(m, m.ca.IssueLeaf(t, testpki.Leaf{DNSNames: []string{"web.frontend"}}))),
			mesh.ResultNotSPIFFE, mesh.ModeMTLS, DecisionHandshakeFailed, false},
	}

	a := startApp(t, echo)
	st, _ := policyStore(t, peerAuth("STRICT"))
	p := startProxy(t, m.identity(t, echoID), st, WithInboundExplicit("127.0.0.1:0", a.addr()))
	addr := p.Addrs()[0].String()
	valid := meshClient(web)

	peerReasons := map[string]string{}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			hsBefore, totalBefore := handshakes(mesh.DirInbound, tt.result), inboundHandshakes()
			connBefore := connections(mesh.DirInbound, tt.mode, tt.decision)

			if err := tt.client(t, addr); err != nil {
				t.Fatalf("hostile client: %v", err)
			}
			eventually(t, fmt.Sprintf("connections_total{inbound,%s,%s} +1", tt.mode, tt.decision), func() bool {
				return connections(mesh.DirInbound, tt.mode, tt.decision) == connBefore+1
			})
			wantHS := totalBefore
			if tt.result != "" {
				wantHS++
				if got := handshakes(mesh.DirInbound, tt.result) - hsBefore; got != 1 {
					t.Errorf("handshakes_total{inbound,%s} rose by %v, want 1", tt.result, got)
				}
			}
			if got := inboundHandshakes(); got != wantHS {
				t.Errorf("inbound handshakes rose by %v in all, want %v (a reason other than %q was counted)", got-totalBefore, wantHS-totalBefore, tt.result)
			}
			if tt.peerCheck {
				if prev, dup := peerReasons[tt.result]; dup {
					t.Errorf("reason %q also counts %q: the refusals cannot be told apart", tt.result, prev)
				}
				peerReasons[tt.result] = tt.name
			}

			okBefore := handshakes(mesh.DirInbound, mesh.ResultOK)
			if err := valid(t, addr); err != nil {
				t.Fatalf("valid client refused after the hostile one: %v", err)
			}
			if got := handshakes(mesh.DirInbound, mesh.ResultOK) - okBefore; got != 1 {
				t.Errorf("handshakes_total{inbound,ok} rose by %v for the valid client, want 1", got)
			}
		})
	}
}

// appTLSClientRefused is the app's own TLS (ALPN http/1.1), refused on a
// STRICT port before any handshake with the proxy.
func appTLSClientRefused() func(testing.TB, string) error {
	return tlsClientRefused(&tls.Config{InsecureSkipVerify: true, ServerName: "app.test", NextProtos: []string{"http/1.1"}})
}

func TestHalfHellosHeldOpenDoNotExhaustSlots(t *testing.T) {
	const slots = 4
	m := newMesh(t)
	web := m.identity(t, webID)
	hello := captureHello(t, meshClientConfig(web))
	a := startApp(t, echo)
	st, _ := policyStore(t, peerAuth("STRICT"))
	p := startProxy(t, m.identity(t, echoID), st, WithInboundExplicit("127.0.0.1:0", a.addr()),
		WithMaxConnections(slots), WithDetectTimeout(3*time.Second))
	addr := p.Addrs()[0].String()

	timeouts := handshakes(mesh.DirInbound, mesh.ResultTimeout)
	failed := connections(mesh.DirInbound, mesh.ModeUnknown, DecisionHandshakeFailed)
	overLimit := connections(mesh.DirInbound, mesh.ModeUnknown, DecisionOverLimit)

	// Fill every slot with a ClientHello that never finishes.
	held := make([]net.Conn, slots)
	for i := range held {
		held[i] = dial(t, addr)
		if _, err := held[i].Write(hello[:10]); err != nil {
			t.Fatal(err)
		}
	}
	eventually(t, "all slots taken", func() bool {
		p.mu.Lock()
		defer p.mu.Unlock()
		return p.conns.Len() == slots
	})
	// While they are held, the slots really are full.
	if err := meshClient(web)(t, addr); err == nil {
		t.Fatal("a client was served past --max-connections while the half-hellos were held")
	}
	eventually(t, "over_limit counted", func() bool {
		return connections(mesh.DirInbound, mesh.ModeUnknown, DecisionOverLimit) == overLimit+1
	})

	// The detect timeout closes every half-hello and counts it.
	for i, c := range held {
		if err := expectClosedByProxy(c); err != nil {
			t.Fatalf("half-hello %d: %v", i, err)
		}
	}
	eventually(t, "timeouts counted", func() bool {
		return handshakes(mesh.DirInbound, mesh.ResultTimeout) == timeouts+slots &&
			connections(mesh.DirInbound, mesh.ModeUnknown, DecisionHandshakeFailed) == failed+slots
	})

	// The slots are free again: a valid client is served.
	eventually(t, "slots released", func() bool {
		p.mu.Lock()
		defer p.mu.Unlock()
		return p.conns.Len() == 0
	})
	if err := meshClient(web)(t, addr); err != nil {
		t.Fatalf("valid client refused after the half-hellos timed out: %v", err)
	}
}

func TestConnectionFloodPastMaxConnections(t *testing.T) {
	const (
		slots = 8
		flood = 200
	)
	m := newMesh(t)
	web := m.identity(t, webID)
	a := startApp(t, echo)
	st, _ := policyStore(t, peerAuth("STRICT"))
	p := startProxy(t, m.identity(t, echoID), st, WithInboundExplicit("127.0.0.1:0", a.addr()), WithMaxConnections(slots))
	addr := p.Addrs()[0].String()

	// Fill every slot with an established mesh connection.
	existing := make([]*tls.Conn, slots)
	for i := range existing {
		existing[i] = tls.Client(dial(t, addr), meshClientConfig(web))
		if err := roundTrip(existing[i], fmt.Sprintf("kept %d\n", i)); err != nil {
			t.Fatalf("connection %d: %v", i, err)
		}
	}
	overLimit := connections(mesh.DirInbound, mesh.ModeUnknown, DecisionOverLimit)

	// Flood: every new connection is closed at once and counted.
	var wg sync.WaitGroup
	errs := make(chan error, flood)
	for i := range flood {
		wg.Go(func() {
			c, err := net.DialTimeout("tcp", addr, clientWait)
			if err != nil {
				errs <- fmt.Errorf("flood dial %d: %w", i, err)
				return
			}
			defer c.Close()
			_, _ = c.Write([]byte("flood\n"))
			if err := expectClosedByProxy(c); err != nil {
				errs <- fmt.Errorf("flood connection %d: %w", i, err)
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	eventually(t, "every flood connection counted over_limit", func() bool {
		return connections(mesh.DirInbound, mesh.ModeUnknown, DecisionOverLimit) == overLimit+flood
	})

	// The connections that were in first are untouched.
	for i, c := range existing {
		if err := roundTrip(c, fmt.Sprintf("still kept %d\n", i)); err != nil {
			t.Fatalf("existing connection %d hurt by the flood: %v", i, err)
		}
	}
	// Once one leaves, a valid client takes its slot.
	existing[0].Close()
	eventually(t, "slot released", func() bool {
		p.mu.Lock()
		defer p.mu.Unlock()
		return p.conns.Len() < slots
	})
	if err := meshClient(web)(t, addr); err != nil {
		t.Fatalf("valid client refused after the flood: %v", err)
	}
}
