package spireint

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"

	"github.com/meshproxy/meshproxy/tlsmgr"
)

// TestSPIREIdentitiesMTLSAndRotations registers two workload entries
// whose selector (unix:path of this test binary) both match this process,
// so the agent hands it both SVIDs and each source picks its own with
// tlsmgr.WithID: a client and a server identity in one process. Then:
//  1. each source holds the SVID of its entry and SPIRE's trust bundle,
//     and a source without WithID gets the agent's default (first) SVID;
//  2. ServerConfig/ClientConfig endpoints complete mutual TLS on loopback
//     and each sees the other's SPIFFE ID;
//  3. SPIRE re-issues both SVIDs (20 s TTL) while handshakes run in a
//     loop: every handshake succeeds, serials change, Generation bumps;
//  4. a SPIRE CA rotation (localauthority x509 prepare, then activate):
//     the new root reaches both sources as a bundle update, then SVIDs
//     signed by the new CA, and again no handshake fails.
func TestSPIREIdentitiesMTLSAndRotations(t *testing.T) {
	skipShort(t)
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	self := pathSelector(t, exe)
	spire := startSPIRE(t, entry{clientID, []string{self}}, entry{serverID, []string{self}})
	td := spiffeid.RequireTrustDomainFromString(trustDomain)

	client := newSource(t, spire, clientID)
	server := newSource(t, spire, serverID)

	// 1. The SVIDs of the entries, the trust domain's bundle from SPIRE.
	wantRoots, err := x509bundle.Parse(td, spire.bundlePEM)
	if err != nil {
		t.Fatalf("parse `spire-server bundle show`: %v", err)
	}
	for _, tc := range []struct {
		src  *tlsmgr.WorkloadAPISource
		want string
	}{{client, clientID}, {server, serverID}} {
		st := tc.src.Status()
		if st.ID.String() != tc.want || st.Source != "workload-api" {
			t.Errorf("Status() = {ID %s, Source %q}, want {%s, workload-api}", st.ID, st.Source, tc.want)
		}
		if life := st.NotAfter.Sub(st.NotBefore); life > svidTTL+time.Minute {
			t.Errorf("%s: SVID lifetime %s, want about the configured %s", tc.want, life, svidTTL)
		}
		if err := tc.src.Ready(); err != nil {
			t.Errorf("%s: Ready() = %v", tc.want, err)
		}
		if got := roots(t, tc.src); len(got) != len(wantRoots.X509Authorities()) || !wantRoots.HasX509Authority(got[0]) {
			t.Errorf("%s: bundle of %s has %d roots, want SPIRE's %d", tc.want, trustDomain, len(got), len(wantRoots.X509Authorities()))
		}
	}
	if got := newSource(t, spire, "").Status().ID.String(); got != clientID && got != serverID {
		t.Errorf("without WithID the source got %s, want one of this process's entries", got)
	}

	// 2. Mutual TLS between the two SPIRE identities.
	srv := startTLSServer(t, tlsmgr.ServerConfig(server, tlsconfig.AuthorizeID(spiffeid.RequireFromString(clientID))))
	clientCfg := tlsmgr.ClientConfig(client, tlsconfig.AuthorizeID(spiffeid.RequireFromString(serverID)))
	sawServer, err := srv.roundTrip(clientCfg)
	if err != nil {
		t.Fatalf("mTLS between SPIRE identities: %v\n%s", err, spire.logs())
	}
	if sawServer.String() != serverID {
		t.Errorf("client saw server %s, want %s", sawServer, serverID)
	}
	if got := srv.lastPeer(); got.String() != clientID {
		t.Errorf("server saw client %s, want %s", got, clientID)
	}
	loop := &handshakeLoop{t: t, spire: spire, srv: srv, cfg: clientCfg}

	// 3. SVID rotation by SPIRE.
	startSerial := map[string]string{clientID: client.Status().Serial, serverID: server.Status().Serial}
	startGen := map[string]uint64{clientID: client.Generation(), serverID: server.Generation()}
	loop.until("SPIRE to re-issue both SVIDs", 3*svidTTL, func() bool {
		return client.Status().Serial != startSerial[clientID] && server.Status().Serial != startSerial[serverID]
	})
	for _, tc := range []struct {
		src *tlsmgr.WorkloadAPISource
		id  string
	}{{client, clientID}, {server, serverID}} {
		if g := tc.src.Generation(); g <= startGen[tc.id] {
			t.Errorf("%s: Generation %d did not move past %d after rotation", tc.id, g, startGen[tc.id])
		}
		if st := tc.src.Status(); st.ID.String() != tc.id || st.LastError != "" {
			t.Errorf("%s after rotation: ID %s, LastError %q", tc.id, st.ID, st.LastError)
		}
	}

	// 4. CA rotation: prepare publishes the next root, activate signs with it.
	oldRoots := roots(t, server)
	out := spire.ctl(spireBin.server, "localauthority", "x509", "prepare", "-socketPath", spire.serverSock, "-output", "json")
	m := regexp.MustCompile(`"authority_id"\s*:\s*"([^"]+)"`).FindStringSubmatch(out)
	if m == nil {
		spire.fatalf("no authority_id in `localauthority x509 prepare` output: %s", out)
	}
	loop.until("the prepared root to reach both sources' bundles", waitLimit, func() bool {
		return len(roots(t, client)) == len(oldRoots)+1 && len(roots(t, server)) == len(oldRoots)+1
	})
	var next *x509.Certificate
	for _, r := range roots(t, server) {
		if !slices.ContainsFunc(oldRoots, r.Equal) {
			next = r
		}
	}
	spire.ctl(spireBin.server, "localauthority", "x509", "activate", "-socketPath", spire.serverSock, "-authorityID", m[1])
	signedByNext := func(src *tlsmgr.WorkloadAPISource) bool {
		chain := src.Status().Chain
		return chain[len(chain)-1].CheckSignatureFrom(next) == nil
	}
	loop.until("SVIDs signed by the new CA in both sources", waitLimit, func() bool {
		return signedByNext(client) && signedByNext(server)
	})
	t.Logf("%d handshakes across the SVID and CA rotations, none failed", loop.n)

	// Rotate re-fetches from the agent and keeps the same identity.
	ctx, cancel := context.WithTimeout(context.Background(), waitLimit)
	defer cancel()
	if err := server.Rotate(ctx); err != nil {
		t.Errorf("Rotate (re-fetch from the agent): %v", err)
	}
	if got := server.Status().ID.String(); got != serverID {
		t.Errorf("after Rotate the server is %s, want %s", got, serverID)
	}
}

// roots returns src's trust anchors for the test trust domain.
func roots(t *testing.T, src *tlsmgr.WorkloadAPISource) []*x509.Certificate {
	t.Helper()
	b, err := src.GetX509BundleForTrustDomain(spiffeid.RequireTrustDomainFromString(trustDomain))
	if err != nil {
		t.Fatalf("no bundle for %s: %v", trustDomain, err)
	}
	return b.X509Authorities()
}

// handshakeLoop runs client handshakes against srv, one every 20 ms,
// while the test waits for SPIRE to do something; none may fail.
type handshakeLoop struct {
	t     *testing.T
	spire *deployment
	srv   *tlsServer
	cfg   *tls.Config
	n     int
}

// until handshakes until cond holds (failing the test after limit), then
// 10 more; it fails the test if any handshake failed.
func (l *handshakeLoop) until(what string, limit time.Duration, cond func() bool) {
	l.t.Helper()
	deadline := time.Now().Add(limit)
	var failures []string
	after := -1
	for i := 0; i < 100000 && after < 10; i++ {
		peer, err := l.srv.roundTrip(l.cfg)
		l.n++
		switch {
		case err != nil:
			failures = append(failures, fmt.Sprintf("#%d at %s: %v", l.n, time.Now().Format(time.StampMilli), err))
		case peer.String() != serverID:
			failures = append(failures, fmt.Sprintf("#%d: client saw %s", l.n, peer))
		}
		switch {
		case after >= 0:
			after++
		case cond():
			after = 0
		case time.Now().After(deadline):
			l.spire.fatalf("timed out after %s waiting for %s (%d failed handshakes meanwhile)", limit, what, len(failures))
		}
		time.Sleep(20 * time.Millisecond) // pace: leave CPU to SPIRE on a shared machine
	}
	if len(failures) > 0 {
		l.t.Fatalf("%d handshakes failed while waiting for %s:\n%s\n%s", len(failures), what, strings.Join(failures, "\n"), l.spire.logs())
	}
}

// newSource runs a source for the agent until the test ends and waits for
// the SVID of id (any SVID if id is empty).
func newSource(t *testing.T, spire *deployment, id string) *tlsmgr.WorkloadAPISource {
	t.Helper()
	opts := []tlsmgr.Option{tlsmgr.WithTrustDomain(spiffeid.RequireTrustDomainFromString(trustDomain))}
	if id != "" {
		opts = append(opts, tlsmgr.WithID(spiffeid.RequireFromString(id)))
	}
	src := runSource(t, spire.addr(), opts...)
	ctx, cancel := context.WithTimeout(context.Background(), waitLimit)
	defer cancel()
	if err := tlsmgr.WaitReady(ctx, src); err != nil {
		spire.fatalf("no SVID %s from the SPIRE agent within %s: %v", id, waitLimit, err)
	}
	return src
}

// runSource creates a Workload API source and runs it until the test ends.
func runSource(t *testing.T, addr string, opts ...tlsmgr.Option) *tlsmgr.WorkloadAPISource {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	opts = append([]tlsmgr.Option{
		tlsmgr.WithBackoff(200*time.Millisecond, 2*time.Second),
		tlsmgr.WithLogger(testLogger(t)),
	}, opts...)
	src, err := tlsmgr.NewWorkloadAPISource(ctx, addr, opts...)
	if err != nil {
		cancel()
		t.Fatalf("NewWorkloadAPISource(%s): %v", addr, err)
	}
	done := make(chan error, 1)
	go func() { done <- src.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("source Run: %v", err)
			}
		case <-time.After(30 * time.Second):
			t.Error("source Run did not return after cancel")
		}
	})
	return src
}

func testLogger(t *testing.T) *slog.Logger {
	if !testing.Verbose() {
		return slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	return slog.New(slog.NewTextHandler(logWriter{t}, &slog.HandlerOptions{Level: slog.LevelInfo}))
}

type logWriter struct{ t *testing.T }

func (w logWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// tlsServer accepts connections on loopback, completes the handshake,
// records the client's SPIFFE ID and answers one byte.
type tlsServer struct {
	ln   net.Listener
	wg   sync.WaitGroup
	mu   sync.Mutex
	peer spiffeid.ID
}

func startTLSServer(t *testing.T, cfg *tls.Config) *tlsServer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &tlsServer{ln: ln}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s.wg.Add(1)
			go func() {
				defer s.wg.Done()
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(30 * time.Second))
				tc := tls.Server(c, cfg)
				if err := tc.Handshake(); err != nil {
					return
				}
				if id, err := tlsmgr.PeerID(tc.ConnectionState()); err == nil {
					s.mu.Lock()
					s.peer = id
					s.mu.Unlock()
				}
				_, _ = tc.Write([]byte("k"))
				_ = tc.Close()
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		s.wg.Wait()
	})
	return s
}

func (s *tlsServer) lastPeer() spiffeid.ID {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.peer
}

// roundTrip handshakes with cfg, reads the server's byte and returns the
// server's SPIFFE ID.
func (s *tlsServer) roundTrip(cfg *tls.Config) (spiffeid.ID, error) {
	raw, err := net.DialTimeout("tcp", s.ln.Addr().String(), 30*time.Second)
	if err != nil {
		return spiffeid.ID{}, err
	}
	defer raw.Close()
	_ = raw.SetDeadline(time.Now().Add(30 * time.Second))
	c := tls.Client(raw, cfg)
	if err := c.Handshake(); err != nil {
		return spiffeid.ID{}, fmt.Errorf("handshake: %w", err)
	}
	if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
		return spiffeid.ID{}, fmt.Errorf("read after handshake (server refused us?): %w", err)
	}
	id, err := tlsmgr.PeerID(c.ConnectionState())
	if err != nil {
		return spiffeid.ID{}, errors.Join(errors.New("server SPIFFE ID"), err)
	}
	return id, nil
}
