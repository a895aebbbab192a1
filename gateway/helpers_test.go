package gateway

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/meshproxy/meshproxy/internal/testpki"
	"github.com/meshproxy/meshproxy/metrics"
	"github.com/meshproxy/meshproxy/policy"
	"github.com/meshproxy/meshproxy/proxy"
	"github.com/meshproxy/meshproxy/proxy/proxytest"
	"github.com/meshproxy/meshproxy/tlsmgr"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// Identities used across the tests.
const (
	gatewayID  = "spiffe://cluster.local/ns/istio-system/sa/ingress"
	shopID     = "spiffe://cluster.local/ns/shop/sa/web"
	otherID    = "spiffe://cluster.local/ns/other/sa/intruder"
	clientWait = 30 * time.Second // generous: the machine is shared and loaded
)

var quietLog = slog.New(slog.DiscardHandler)

// world is a mesh CA and a separate public CA for the gateway's server
// certificates and clients.
type world struct {
	mesh   *testpki.CA
	public *testpki.CA
}

func newWorld(t testing.TB) *world {
	return &world{mesh: testpki.New(t, "cluster.local"), public: testpki.New(t, "public.test")}
}

// identity returns a static mesh Source for id.
func (w *world) identity(t testing.TB, id string) *tlsmgr.Static {
	return tlsmgr.NewStatic(w.mesh.Issue(t, id, time.Hour), w.mesh.Bundle())
}

// publicPool trusts the public CA.
func (w *world) publicPool() *x509.CertPool {
	pool := x509.NewCertPool()
	pool.AddCert(w.public.Root)
	return pool
}

// serverCert issues a public server certificate for names.
func (w *world) serverCert(t testing.TB, names ...string) *x509svid.SVID {
	return w.public.IssueLeaf(t, testpki.Leaf{DNSNames: names})
}

// writeCredential writes NAME.crt and NAME.key (and NAME-ca.crt with the
// roots of clientCA, if given) the way a Secret volume update lands: each
// file replaced by a rename.
func writeCredential(t testing.TB, dir, name string, cert *x509svid.SVID, clientCA *testpki.CA) {
	t.Helper()
	certPEM, keyPEM, err := cert.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	atomicWrite(t, filepath.Join(dir, name+".crt"), certPEM)
	atomicWrite(t, filepath.Join(dir, name+".key"), keyPEM)
	if clientCA != nil {
		atomicWrite(t, filepath.Join(dir, name+"-ca.crt"), testpki.PEMCerts(clientCA.Root))
	}
}

func atomicWrite(t testing.TB, path string, data []byte) {
	t.Helper()
	tmp := filepath.Join(filepath.Dir(path), "."+filepath.Base(path)+".tmp")
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// env is a running gateway with its directories.
type env struct {
	gw        *Gateway
	configDir string
	credDir   string
}

// addr is the bound address of the listener for a Gateway port.
func (e *env) addr(t testing.TB, port uint16) string {
	t.Helper()
	a := e.gw.Addr(port)
	if a == nil {
		t.Fatalf("no listener for port %d", port)
	}
	return a.String()
}

// startGateway writes config (YAML) and starts a gateway with src's
// identity, every port on a free loopback port, watching both directories.
// prepare may write credentials before the start.
func startGateway(t testing.TB, src tlsmgr.Source, config string, prepare func(credDir string), opts ...Option) *env {
	t.Helper()
	e := &env{configDir: t.TempDir(), credDir: t.TempDir()}
	writeConfig(t, e.configDir, config)
	if prepare != nil {
		prepare(e.credDir)
	}
	st, err := policy.NewStore(e.configDir, policy.Workload{Namespace: DefaultNamespace, Labels: map[string]string{"istio": "ingressgateway"}},
		policy.WithLogger(quietLog), policy.WithPollInterval(100*time.Millisecond))
	if err != nil {
		t.Fatalf("policy store: %v", err)
	}
	base := []Option{
		WithLogger(quietLog),
		WithPollInterval(100 * time.Millisecond),
		WithListenAddr(func(uint16) string { return "127.0.0.1:0" }),
	}
	gw, err := New(src, st, e.configDir, e.credDir, append(base, opts...)...)
	if err != nil {
		t.Fatalf("new gateway: %v", err)
	}
	if err := gw.Start(context.Background()); err != nil {
		t.Fatalf("start gateway: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() { _ = st.Run(ctx) })
	wg.Go(func() { _ = gw.Run(ctx) })
	t.Cleanup(func() {
		sctx, scancel := context.WithTimeout(context.Background(), clientWait)
		defer scancel()
		if err := gw.Shutdown(sctx); err != nil {
			t.Errorf("gateway shutdown: %v", err)
		}
		cancel()
		wg.Wait()
	})
	e.gw = gw
	return e
}

func writeConfig(t testing.TB, dir, yaml string) {
	t.Helper()
	atomicWrite(t, filepath.Join(dir, "gateway.yaml"), []byte(yaml))
}

// meshService is a real sidecar in STRICT mode in front of app: the mesh
// service the gateway routes to.
type meshService struct {
	proxy *proxy.Proxy
	addr  string
	port  uint16
}

// startMeshService starts a STRICT sidecar with identity id forwarding to
// app. policyYAML (optional) is the sidecar's own policy directory content.
func startMeshService(t testing.TB, w *world, id, app, policyYAML string) *meshService {
	t.Helper()
	dir := t.TempDir()
	if policyYAML != "" {
		atomicWrite(t, filepath.Join(dir, "policy.yaml"), []byte(policyYAML))
	}
	st, err := policy.NewStore(dir, policy.Workload{Namespace: "shop", Labels: map[string]string{"app": "web"}},
		policy.WithDefaultMode(policy.ModeStrict), policy.WithLogger(quietLog))
	if err != nil {
		t.Fatalf("sidecar policy: %v", err)
	}
	p := proxy.New(w.identity(t, id), st, proxy.WithLogger(quietLog), proxy.WithInboundExplicit("127.0.0.1:0", app))
	if err := p.Start(context.Background()); err != nil {
		t.Fatalf("start sidecar: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), clientWait)
		defer cancel()
		if err := p.Shutdown(ctx); err != nil {
			t.Errorf("sidecar shutdown: %v", err)
		}
	})
	addr := p.Addrs()[0].(*net.TCPAddr)
	return &meshService{proxy: p, addr: addr.String(), port: uint16(addr.Port)}
}

// app is a TCP server on loopback running handle for each connection.
type app struct{ *proxytest.App }

func (a *app) addr() string { return a.Addr() }

func (a *app) port() uint16 { return a.Port() }

func (a *app) acceptedCount() int { return a.Accepted() }

func startApp(t testing.TB, handle func(net.Conn)) *app {
	t.Helper()
	return &app{proxytest.StartApp(t, 2*clientWait, handle)}
}

// echo copies everything back, then half-closes.
func echo(c net.Conn) { proxytest.Echo(c) }

// tlsEcho terminates TLS with cert, then echoes: a backend that speaks its
// own TLS (for PASSTHROUGH).
func tlsEcho(cert *x509svid.SVID) func(net.Conn) {
	cfg := &tls.Config{Certificates: []tls.Certificate{testpki.TLSCertificate(cert)}}
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

// tlsDial runs a TLS handshake with cfg over a fresh connection to addr.
func tlsDial(t testing.TB, addr string, cfg *tls.Config) (*tls.Conn, error) {
	t.Helper()
	tc := tls.Client(dial(t, addr), cfg)
	return tc, tc.Handshake()
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

// gatewayConns reads meshproxy_gateway_connections_total.
func gatewayConns(listener uint16, route, result string) float64 {
	return testutil.ToFloat64(metrics.GatewayConnections.WithLabelValues(strconv.Itoa(int(listener)), route, result))
}

// eventually polls cond until it holds or the wait is over.
func eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(clientWait)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
