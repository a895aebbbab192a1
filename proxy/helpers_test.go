package proxy

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/meshproxy/meshproxy/internal/loopback"
	"github.com/meshproxy/meshproxy/internal/testpki"
	"github.com/meshproxy/meshproxy/metrics"
	"github.com/meshproxy/meshproxy/policy"
	"github.com/meshproxy/meshproxy/proxy/mesh"
	"github.com/meshproxy/meshproxy/proxy/proxytest"
	"github.com/meshproxy/meshproxy/tlsmgr"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Identities used across the tests.
const (
	echoID     = "spiffe://cluster.local/ns/default/sa/echo"
	webID      = "spiffe://cluster.local/ns/frontend/sa/web"
	otherID    = "spiffe://cluster.local/ns/other/sa/intruder"
	clientWait = 30 * time.Second // generous: the machine is shared and loaded
)

var quietLog = slog.New(slog.DiscardHandler)

// testMesh is a trust domain with its CA.
type testMesh struct {
	ca *testpki.CA
}

func newMesh(t testing.TB) *testMesh { return &testMesh{ca: testpki.New(t, "cluster.local")} }

// identity returns a static Source for id, trusting the mesh's CA.
func (m *testMesh) identity(t testing.TB, id string) *tlsmgr.Static {
	return tlsmgr.NewStatic(m.ca.Issue(t, id, time.Hour), m.ca.Bundle())
}

// policyStore loads yaml (may be empty) from a fresh directory for the
// workload default/app=echo (no DestinationRule host resolves: offlineDNS)
// and runs the store's watcher until cleanup.
func policyStore(t testing.TB, yaml string) (*policy.Store, string) {
	t.Helper()
	dir := t.TempDir()
	if yaml != "" {
		writePolicy(t, dir, yaml)
	}
	st, err := policy.NewStore(dir, policy.Workload{Namespace: "default", Labels: map[string]string{"app": "echo"}},
		policy.WithLogger(quietLog), policy.WithPollInterval(100*time.Millisecond), policy.WithResolver(offlineDNS))
	if err != nil {
		t.Fatalf("policy store: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = st.Run(ctx)
	}()
	t.Cleanup(func() { cancel(); <-done })
	return st, dir
}

func writePolicy(t testing.TB, dir, yaml string) {
	t.Helper()
	tmp := filepath.Join(dir, ".policy.yaml.tmp")
	if err := os.WriteFile(tmp, []byte(yaml), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(dir, "policy.yaml")); err != nil {
		t.Fatal(err)
	}
}

// peerAuth is a namespace-wide PeerAuthentication in mode.
func peerAuth(mode string) string {
	return fmt.Sprintf(`apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
  namespace: default
spec:
  mtls:
    mode: %s
`, mode)
}

// startProxy starts a proxy and shuts it down at cleanup.
func startProxy(t testing.TB, src tlsmgr.Source, pol mesh.PolicySource, opts ...Option) *Proxy {
	t.Helper()
	p := New(src, pol, append([]Option{WithLogger(quietLog)}, opts...)...)
	if err := p.Start(context.Background()); err != nil {
		t.Fatalf("start proxy: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := p.Shutdown(ctx); err != nil {
			t.Errorf("shutdown: %v", err)
		}
	})
	return p
}

// app is a TCP server on loopback running handle for each connection.
type app struct{ *proxytest.App }

func (a *app) addr() string { return a.Addr() }

func startApp(t testing.TB, handle func(net.Conn)) *app {
	t.Helper()
	return &app{proxytest.StartApp(t, 2*clientWait, handle)}
}

// echo copies everything back, then half-closes.
func echo(c net.Conn) { proxytest.Echo(c) }

// banner speaks first, then echoes.
func banner(c net.Conn) {
	if _, err := io.WriteString(c, "220 banner\r\n"); err != nil {
		return
	}
	echo(c)
}

// tlsApp is an app that terminates its own TLS with a DNS certificate
// for app.test, then echoes.
func tlsApp(m *testMesh, t testing.TB) func(net.Conn) {
	svid := m.ca.IssueLeaf(t, testpki.Leaf{DNSNames: []string{"app.test"}})
	cfg := &tls.Config{Certificates: []tls.Certificate{testpki.TLSCertificate(svid)}, NextProtos: []string{"http/1.1"}}
	return func(c net.Conn) {
		tc := tls.Server(c, cfg)
		if err := tc.Handshake(); err != nil {
			return
		}
		echo(tc)
	}
}

// dial connects to addr with a deadline covering the whole exchange.
func dial(t testing.TB, addr string) net.Conn {
	t.Helper()
	return proxytest.Dial(t, addr, clientWait)
}

// roundTrip writes msg and expects it echoed back.
func roundTrip(c net.Conn, msg string) error {
	if _, err := io.WriteString(c, msg); err != nil {
		return fmt.Errorf("write: %w", err)
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil {
		return fmt.Errorf("read: %w", err)
	}
	if string(got) != msg {
		return fmt.Errorf("echo = %q, want %q", got, msg)
	}
	return nil
}

// meshClientConfig is what a mesh peer with src's identity dials with.
func meshClientConfig(src tlsmgr.Source) *tls.Config {
	return tlsmgr.ClientConfig(src, nil, tlsmgr.ALPNIstio)
}

// Clients of the wire table. Each returns nil if the exchange worked.
func plaintextClient(t testing.TB, addr string) error {
	return roundTrip(dial(t, addr), "ping\n")
}

func meshClient(src tlsmgr.Source) func(testing.TB, string) error {
	return func(t testing.TB, addr string) error {
		tc := tls.Client(dial(t, addr), meshClientConfig(src))
		if err := tc.Handshake(); err != nil {
			return fmt.Errorf("handshake: %w", err)
		}
		return roundTrip(tc, "ping\n")
	}
}

func appTLSClient(m *testMesh) func(testing.TB, string) error {
	pool := x509.NewCertPool()
	pool.AddCert(m.ca.Root)
	return func(t testing.TB, addr string) error {
		tc := tls.Client(dial(t, addr), &tls.Config{RootCAs: pool, ServerName: "app.test", NextProtos: []string{"http/1.1"}})
		if err := tc.Handshake(); err != nil {
			return fmt.Errorf("handshake: %w", err)
		}
		return roundTrip(tc, "ping\n")
	}
}

// silentClient sends nothing and expects the app's banner.
func silentClient(t testing.TB, addr string) error {
	c := dial(t, addr)
	got := make([]byte, len("220 banner\r\n"))
	if _, err := io.ReadFull(c, got); err != nil {
		return fmt.Errorf("read banner: %w", err)
	}
	if string(got) != "220 banner\r\n" {
		return fmt.Errorf("banner = %q", got)
	}
	return nil
}

// meshHelloVerbatim sends a mesh ClientHello and expects the echo app to
// send back exactly those bytes: proof the proxy passed it through untouched.
func meshHelloVerbatim(src tlsmgr.Source) func(testing.TB, string) error {
	return func(t testing.TB, addr string) error {
		hello := captureHello(t, meshClientConfig(src))
		c := dial(t, addr)
		if _, err := c.Write(hello); err != nil {
			return err
		}
		got := make([]byte, len(hello))
		if _, err := io.ReadFull(c, got); err != nil {
			return fmt.Errorf("read: %w", err)
		}
		if !bytes.Equal(got, hello) {
			return errors.New("the app did not receive the ClientHello verbatim")
		}
		return nil
	}
}

// captureHello returns the first flight a TLS client with cfg sends.
func captureHello(t testing.TB, cfg *tls.Config) []byte {
	t.Helper()
	a, b := tcpPair(t)
	go func() {
		_ = tls.Client(a, cfg).Handshake()
	}()
	_ = b.SetReadDeadline(time.Now().Add(clientWait))
	hdr := make([]byte, 5)
	if _, err := io.ReadFull(b, hdr); err != nil {
		t.Fatalf("capture hello: %v", err)
	}
	body := make([]byte, int(hdr[3])<<8|int(hdr[4]))
	if _, err := io.ReadFull(b, body); err != nil {
		t.Fatalf("capture hello: %v", err)
	}
	a.Close()
	return append(hdr, body...)
}

// tcpPair returns both ends of a loopback TCP connection.
func tcpPair(t testing.TB) (net.Conn, net.Conn) {
	c, s := loopback.TCPPair(t)
	return c, s
}

// fixedDst is an OriginalDstFunc that always answers dst.
func fixedDst(dst string) OriginalDstFunc {
	ap := netip.MustParseAddrPort(dst)
	return func(net.Conn) (netip.AddrPort, error) { return ap, nil }
}

func connections(dir, mode, decision string) float64 {
	return testutil.ToFloat64(metrics.Connections.WithLabelValues(dir, mode, decision))
}

func handshakes(dir, result string) float64 {
	return testutil.ToFloat64(metrics.Handshakes.WithLabelValues(dir, result))
}

func denials(reason string) float64 {
	return testutil.ToFloat64(metrics.PolicyDenials.WithLabelValues(reason))
}

// eventually polls cond until it holds or the wait is over.
func eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(clientWait)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func mustID(t testing.TB, s string) spiffeid.ID {
	t.Helper()
	id, err := spiffeid.FromString(s)
	if err != nil {
		t.Fatal(err)
	}
	return id
}
