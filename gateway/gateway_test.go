package gateway

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/meshproxy/meshproxy/internal/testpki"
	"github.com/meshproxy/meshproxy/metrics"
	"github.com/meshproxy/meshproxy/proxy/admin"
	"github.com/meshproxy/meshproxy/proxy/conntrack"
	"github.com/meshproxy/meshproxy/proxy/mesh"
	"github.com/meshproxy/meshproxy/tlsmgr"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// gatewayYAML is one Gateway named ingress in istio-system with servers.
func gatewayYAML(servers string) string {
	return `apiVersion: networking.istio.io/v1
kind: Gateway
metadata:
  name: ingress
  namespace: istio-system
spec:
  selector:
    istio: ingressgateway
  servers:
` + servers
}

// tcpRouteYAML is a VirtualService in namespace shop routing port to dest.
func tcpRouteYAML(name, host string, port uint16, dest string, destPort uint16) string {
	return fmt.Sprintf(`---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: %s
  namespace: shop
spec:
  hosts: [%q]
  gateways: [istio-system/ingress]
  tcp:
  - match:
    - port: %d
    route:
    - destination:
        host: %s
        port:
          number: %d
`, name, host, port, dest, destPort)
}

func TestSimpleGatewayReachesStrictServiceWithItsOwnIdentity(t *testing.T) {
	w := newWorld(t)
	backend := &http.Server{Handler: http.HandlerFunc(func(rw http.ResponseWriter, _ *http.Request) {
		_, _ = io.WriteString(rw, "hello from shop")
	}), ReadHeaderTimeout: clientWait}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = backend.Serve(ln) }()
	t.Cleanup(func() { _ = backend.Close() })

	// The service allows the gateway's principal and nobody else.
	svc := startMeshService(t, w, shopID, ln.Addr().String(), `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: only-ingress
  namespace: shop
spec:
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/istio-system/sa/ingress"]
`)
	shopCert := w.serverCert(t, "shop.example.com")
	e := startGateway(t, w.identity(t, gatewayID), gatewayYAML(`
  - port: {number: 8443, name: https, protocol: HTTPS}
    hosts: ["shop.example.com"]
    tls: {mode: SIMPLE, credentialName: shop-cert}
`)+tcpRouteYAML("shop", "shop.example.com", 8443, "127.0.0.1", svc.port),
		func(dir string) { writeCredential(t, dir, "shop-cert", shopCert, nil) })

	okBefore := gatewayConns(8443, "shop/shop", ResultOK)
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: w.publicPool(), ServerName: "shop.example.com"}}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr, Timeout: clientWait}
	resp, err := client.Get("https://" + e.addr(t, 8443) + "/")
	if err != nil {
		t.Fatalf("https through the gateway: %v", err)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || string(body) != "hello from shop" {
		t.Fatalf("body = %q, %v; want the service's answer", body, err)
	}
	if resp.TLS == nil || !resp.TLS.PeerCertificates[0].Equal(shopCert.Certificates[0]) {
		t.Error("the client did not see the gateway's public certificate for shop.example.com")
	}

	// The kept-alive connection is open: the sidecar sees the gateway's SPIFFE ID.
	peers := svc.proxy.Peers()
	if len(peers) != 1 || peers[0].PeerSPIFFEID != gatewayID || peers[0].Mode != "mtls" {
		t.Errorf("sidecar peers = %+v, want one mtls connection from %s", peers, gatewayID)
	}
	gwPeers := e.gw.Peers()
	if len(gwPeers) != 1 || gwPeers[0].PeerSPIFFEID != shopID || gwPeers[0].Direction != mesh.DirGateway {
		t.Errorf("gateway peers = %+v, want one connection to %s", gwPeers, shopID)
	}
	if got := gatewayConns(8443, "shop/shop", ResultOK) - okBefore; got != 1 {
		t.Errorf("gateway_connections_total{result=ok} grew by %v, want 1", got)
	}

	// Another mesh identity is refused by the same policy: the gateway got
	// in because of who it is.
	tc, err := tlsDial(t, svc.addr, tlsmgr.ClientConfig(w.identity(t, otherID), nil, tlsmgr.ALPNIstio))
	if err == nil {
		_, err = tc.Read(make([]byte, 1))
	}
	if err == nil {
		t.Error("a mesh client other than the gateway was let through")
	}
}

func TestMutualRequiresClientCertificateFromTheCA(t *testing.T) {
	w := newWorld(t)
	clients := testpki.New(t, "clients.test")
	svc := startMeshService(t, w, shopID, startApp(t, echo).addr(), "")
	e := startGateway(t, w.identity(t, gatewayID), gatewayYAML(`
  - port: {number: 8444, name: tls-api, protocol: TLS}
    hosts: ["api.example.com"]
    tls: {mode: MUTUAL, credentialName: api-cert, minProtocolVersion: TLSV1_3}
`)+tcpRouteYAML("api", "api.example.com", 8444, "127.0.0.1", svc.port),
		func(dir string) { writeCredential(t, dir, "api-cert", w.serverCert(t, "api.example.com"), clients) })
	addr := e.addr(t, 8444)

	tests := []struct {
		name   string
		cert   *tls.Certificate
		wantOK bool
	}{
		{"no client certificate", nil, false},
		{"certificate from another CA", ptr(testpki.TLSCertificate(w.public.IssueLeaf(t, testpki.Leaf{DNSNames: []string{"client"}}))), false},
		{"certificate from the client CA", ptr(testpki.TLSCertificate(clients.IssueLeaf(t, testpki.Leaf{DNSNames: []string{"client"}}))), true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			failedBefore := gatewayConns(8444, "shop/api", ResultHandshakeFailed)
			cfg := &tls.Config{RootCAs: w.publicPool(), ServerName: "api.example.com"}
			if tc.cert != nil {
				cfg.Certificates = []tls.Certificate{*tc.cert}
			}
			conn, err := tlsDial(t, addr, cfg)
			if err == nil {
				err = roundTrip(conn, "ping\n")
			}
			if tc.wantOK {
				if err != nil {
					t.Fatalf("valid client certificate refused: %v", err)
				}
				return
			}
			if err == nil {
				t.Fatal("served a client without a valid certificate")
			}
			eventually(t, "handshake_failed counted", func() bool {
				return gatewayConns(8444, "shop/api", ResultHandshakeFailed)-failedBefore == 1
			})
		})
	}
}

func ptr[T any](v T) *T { return &v }

func passthroughYAML(port uint16, backendPort uint16) string {
	return gatewayYAML(fmt.Sprintf(`
  - port: {number: %d, name: tls-db, protocol: TLS}
    hosts: ["db.example.com"]
    tls: {mode: PASSTHROUGH}
`, port)) + fmt.Sprintf(`---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: db
  namespace: shop
spec:
  hosts: ["db.example.com"]
  gateways: [istio-system/ingress]
  tls:
  - match:
    - port: %d
      sniHosts: ["db.example.com"]
    route:
    - destination:
        host: 127.0.0.1
        port: {number: %d}
`, port, backendPort)
}

func TestPassthroughDeliversClientTLSUntouched(t *testing.T) {
	w := newWorld(t)
	backendCert := w.serverCert(t, "db.example.com")
	backend := startApp(t, tlsEcho(backendCert))
	// The gateway has no credential at all: it cannot terminate, only pass through.
	e := startGateway(t, w.identity(t, gatewayID), passthroughYAML(9443, backend.port()), nil)

	conn, err := tlsDial(t, e.addr(t, 9443), &tls.Config{RootCAs: w.publicPool(), ServerName: "db.example.com"})
	if err != nil {
		t.Fatalf("handshake through the gateway: %v", err)
	}
	if !conn.ConnectionState().PeerCertificates[0].Equal(backendCert.Certificates[0]) {
		t.Error("the client did not see the backend's own certificate")
	}
	if err := roundTrip(conn, "select 1\n"); err != nil {
		t.Fatal(err)
	}
	if got := e.gw.Peers(); len(got) != 1 || got[0].Mode != mesh.ModePassthrough || got[0].PeerSPIFFEID != "" {
		t.Errorf("gateway peers = %+v, want one passthrough connection", got)
	}
}

func TestUnknownSNIIsRefusedAndCounted(t *testing.T) {
	w := newWorld(t)
	backend := startApp(t, tlsEcho(w.serverCert(t, "db.example.com")))
	e := startGateway(t, w.identity(t, gatewayID), passthroughYAML(9444, backend.port()), nil)

	for _, sni := range []string{"evil.example.com", "example.com", "db.example.com.evil.test", ""} {
		t.Run("sni="+sni, func(t *testing.T) {
			before := gatewayConns(9444, routeNone, ResultUnknownSNI)
			cfg := &tls.Config{RootCAs: w.publicPool(), ServerName: sni}
			if sni == "" {
				cfg.InsecureSkipVerify = true // no ServerName: no SNI is sent
			}
			if _, err := tlsDial(t, e.addr(t, 9444), cfg); err == nil {
				t.Fatal("handshake succeeded for a name no server covers")
			}
			eventually(t, "unknown_sni counted", func() bool {
				return gatewayConns(9444, routeNone, ResultUnknownSNI)-before == 1
			})
		})
	}
	if n := backend.acceptedCount(); n != 0 {
		t.Errorf("the backend got %d connections; unknown names must never reach it", n)
	}
}

func TestCertificateChangeIsServedWithoutRestart(t *testing.T) {
	w := newWorld(t)
	svc := startMeshService(t, w, shopID, startApp(t, echo).addr(), "")
	first := w.serverCert(t, "shop.example.com")
	e := startGateway(t, w.identity(t, gatewayID), gatewayYAML(`
  - port: {number: 8445, name: https, protocol: HTTPS}
    hosts: ["shop.example.com"]
    tls: {mode: SIMPLE, credentialName: shop-cert}
`)+tcpRouteYAML("shop", "shop.example.com", 8445, "127.0.0.1", svc.port),
		func(dir string) { writeCredential(t, dir, "shop-cert", first, nil) })

	served := func() *tls.ConnectionState {
		conn, err := tlsDial(t, e.addr(t, 8445), &tls.Config{RootCAs: w.publicPool(), ServerName: "shop.example.com"})
		if err != nil {
			t.Fatalf("handshake: %v", err)
		}
		if err := roundTrip(conn, "ping\n"); err != nil {
			t.Fatal(err)
		}
		cs := conn.ConnectionState()
		conn.Close()
		return &cs
	}
	if !served().PeerCertificates[0].Equal(first.Certificates[0]) {
		t.Fatal("not serving the first certificate")
	}

	second := w.serverCert(t, "shop.example.com")
	writeCredential(t, e.credDir, "shop-cert", second, nil)
	eventually(t, "the new certificate served", func() bool {
		return served().PeerCertificates[0].Equal(second.Certificates[0])
	})

	// A certificate whose key is not there yet keeps the last good pair.
	failures := testutil.ToFloat64(metrics.ConfigReloads.WithLabelValues("credentials", "failure"))
	certPEM, _, err := w.serverCert(t, "shop.example.com").Marshal()
	if err != nil {
		t.Fatal(err)
	}
	atomicWrite(t, e.credDir+"/shop-cert.crt", certPEM)
	eventually(t, "the mismatched pair refused", func() bool {
		return testutil.ToFloat64(metrics.ConfigReloads.WithLabelValues("credentials", "failure")) > failures
	})
	if !served().PeerCertificates[0].Equal(second.Certificates[0]) {
		t.Error("a broken update replaced the last good certificate")
	}
}

func TestConfigChangeAppliesWithoutRestart(t *testing.T) {
	w := newWorld(t)
	echoSvc := startMeshService(t, w, shopID, startApp(t, echo).addr(), "")
	bannerSvc := startMeshService(t, w, shopID, startApp(t, func(c net.Conn) {
		_, _ = io.WriteString(c, "220 banner\r\n")
	}).addr(), "")
	tcpServer := `
  - port: {number: 7000, name: tcp-shop, protocol: TCP}
    hosts: ["*"]
`
	// --strict-config: a bad file keeps the whole last good config.
	e := startGateway(t, w.identity(t, gatewayID), gatewayYAML(tcpServer)+tcpRouteYAML("shop", "*", 7000, "127.0.0.1", echoSvc.port), nil, WithStrictConfig(true))
	oldAddr := e.addr(t, 7000)
	if err := roundTrip(dial(t, oldAddr), "ping\n"); err != nil {
		t.Fatalf("before the change: %v", err)
	}
	if e.gw.Addr(7443) != nil {
		t.Fatal("port 7443 bound before it was configured")
	}

	// A new server and port, and the existing route moved to another service.
	shopCert := w.serverCert(t, "shop.example.com")
	writeCredential(t, e.credDir, "shop-cert", shopCert, nil)
	writeConfig(t, e.configDir, gatewayYAML(tcpServer+`
  - port: {number: 7443, name: https, protocol: HTTPS}
    hosts: ["shop.example.com"]
    tls: {mode: SIMPLE, credentialName: shop-cert}
`)+tcpRouteYAML("shop", "*", 7000, "127.0.0.1", bannerSvc.port)+tcpRouteYAML("shop-tls", "shop.example.com", 7443, "127.0.0.1", echoSvc.port))
	eventually(t, "the new listener bound", func() bool { return e.gw.Addr(7443) != nil })
	conn, err := tlsDial(t, e.addr(t, 7443), &tls.Config{RootCAs: w.publicPool(), ServerName: "shop.example.com"})
	if err != nil {
		t.Fatalf("new server: %v", err)
	}
	if err := roundTrip(conn, "ping\n"); err != nil {
		t.Fatalf("new route: %v", err)
	}
	got := make([]byte, len("220 banner\r\n"))
	if _, err := io.ReadFull(dial(t, e.addr(t, 7000)), got); err != nil || string(got) != "220 banner\r\n" {
		t.Errorf("changed route: got %q, %v; want the other service's banner", got, err)
	}

	// A bad file is reported and the last good config stays.
	failures := testutil.ToFloat64(metrics.ConfigReloads.WithLabelValues("gateway", "failure"))
	writeConfig(t, e.configDir, gatewayYAML(`
  - port: {number: 7000, name: tcp-shop, protocol: TCP}
    hosts: ["*"]
    bind: 10.0.0.1
`))
	eventually(t, "the bad config refused", func() bool {
		return testutil.ToFloat64(metrics.ConfigReloads.WithLabelValues("gateway", "failure")) > failures
	})
	if e.gw.Addr(7443) == nil {
		t.Fatal("a bad config removed a listener")
	}

	// Removing a server closes its port.
	writeConfig(t, e.configDir, gatewayYAML(`
  - port: {number: 7443, name: https, protocol: HTTPS}
    hosts: ["shop.example.com"]
    tls: {mode: SIMPLE, credentialName: shop-cert}
`)+tcpRouteYAML("shop-tls", "shop.example.com", 7443, "127.0.0.1", echoSvc.port))
	eventually(t, "port 7000 closed", func() bool { return e.gw.Addr(7000) == nil })
	if c, err := net.DialTimeout("tcp", oldAddr, clientWait); err == nil {
		c.Close()
		t.Error("the removed port still accepts connections")
	}
}

// TestRejectedDocumentIsLeftOutAlone: without --strict-config, a Gateway
// the gateway must refuse does not stop it from starting; its servers are
// not bound, and the valid Gateway next to it serves.
func TestRejectedDocumentIsLeftOutAlone(t *testing.T) {
	w := newWorld(t)
	svc := startMeshService(t, w, shopID, startApp(t, echo).addr(), "")
	bad := `apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: broken, namespace: istio-system}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 7100, name: tcp, protocol: TCP}
    hosts: ["*"]
    bind: 10.0.0.1
`
	e := startGateway(t, w.identity(t, gatewayID), gatewayYAML(`
  - port: {number: 7000, name: tcp-shop, protocol: TCP}
    hosts: ["*"]
`)+tcpRouteYAML("shop", "*", 7000, "127.0.0.1", svc.port)+"---\n"+bad, nil)
	if err := roundTrip(dial(t, e.addr(t, 7000)), "ping\n"); err != nil {
		t.Fatalf("the valid Gateway does not serve: %v", err)
	}
	if e.gw.Addr(7100) != nil {
		t.Error("the rejected Gateway's server is bound")
	}
	if got := testutil.ToFloat64(metrics.ConfigDocuments.WithLabelValues("Gateway", "rejected")); got != 1 {
		t.Errorf("config_documents{Gateway,rejected} = %v, want 1", got)
	}
}

func TestDrainLetsInFlightTransferFinish(t *testing.T) {
	w := newWorld(t)
	svc := startMeshService(t, w, shopID, startApp(t, echo).addr(), "")
	e := startGateway(t, w.identity(t, gatewayID), gatewayYAML(`
  - port: {number: 7100, name: tcp, protocol: TCP}
    hosts: ["*"]
`)+tcpRouteYAML("shop", "*", 7100, "127.0.0.1", svc.port), nil)
	addr := e.addr(t, 7100)
	conn := dial(t, addr)
	if err := roundTrip(conn, "first half\n"); err != nil {
		t.Fatal(err)
	}

	done := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), clientWait)
		defer cancel()
		done <- e.gw.Shutdown(ctx)
	}()
	eventually(t, "the listener closed", func() bool {
		c, err := net.DialTimeout("tcp", addr, clientWait)
		if err != nil {
			return true
		}
		c.Close()
		return false
	})
	if err := e.gw.Ready(); err == nil {
		t.Error("ready while draining")
	}
	select {
	case err := <-done:
		t.Fatalf("shutdown returned (%v) with a transfer in flight", err)
	default:
	}

	payload := strings.Repeat("x", 256<<10)
	errc := make(chan error, 1)
	go func() {
		_, err := io.WriteString(conn, payload)
		if err == nil {
			err = conn.(*net.TCPConn).CloseWrite()
		}
		errc <- err
	}()
	got, err := io.ReadAll(conn)
	if err != nil || string(got) != payload {
		t.Fatalf("in-flight transfer: read %d bytes, %v; want all %d echoed", len(got), err, len(payload))
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Errorf("drain: %v", err)
	}
}

func TestDestinationRuleSANsPinTheServiceIdentity(t *testing.T) {
	w := newWorld(t)
	svc := startMeshService(t, w, shopID, startApp(t, echo).addr(), "")
	config := func(san string) string {
		return gatewayYAML(`
  - port: {number: 7200, name: tcp, protocol: TCP}
    hosts: ["*"]
`) + tcpRouteYAML("shop", "*", 7200, "127.0.0.1", svc.port) + fmt.Sprintf(`---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: shop
  namespace: shop
spec:
  host: 127.0.0.1
  trafficPolicy:
    tls:
      mode: ISTIO_MUTUAL
      subjectAltNames: [%q]
`, san)
	}
	e := startGateway(t, w.identity(t, gatewayID), config(otherID), nil)
	before := gatewayConns(7200, "shop/shop", ResultUpstreamHandshakeFailed)
	if err := roundTrip(dial(t, e.addr(t, 7200)), "ping\n"); err == nil {
		t.Fatal("forwarded to a service that is not the identity the DestinationRule names")
	}
	eventually(t, "upstream_handshake_failed counted", func() bool {
		return gatewayConns(7200, "shop/shop", ResultUpstreamHandshakeFailed)-before == 1
	})

	writeConfig(t, e.configDir, config(shopID))
	eventually(t, "the corrected DestinationRule applied", func() bool {
		c, err := net.DialTimeout("tcp", e.addr(t, 7200), clientWait)
		if err != nil {
			return false
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(clientWait))
		return roundTrip(c, "ping\n") == nil
	})
}

func TestAuthorizationPolicyDeniesGatewayPort(t *testing.T) {
	w := newWorld(t)
	app := startApp(t, echo)
	e := startGateway(t, w.identity(t, gatewayID), gatewayYAML(`
  - port: {number: 7300, name: tcp, protocol: TCP}
    hosts: ["*"]
`)+tcpRouteYAML("shop", "*", 7300, "127.0.0.1", app.port())+`---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: closed
  namespace: istio-system
spec:
  selector:
    matchLabels:
      istio: ingressgateway
  action: DENY
  rules:
  - to:
    - operation:
        ports: ["7300"]
`, nil)
	before := gatewayConns(7300, routeNone, ResultDenied)
	c := dial(t, e.addr(t, 7300))
	if _, err := c.Read(make([]byte, 1)); err == nil {
		t.Fatal("denied port answered")
	}
	eventually(t, "denied counted", func() bool { return gatewayConns(7300, routeNone, ResultDenied)-before == 1 })
	if app.acceptedCount() != 0 {
		t.Error("a denied connection reached the destination")
	}
}

func TestMissingCredentialRefusesUntilItsFilesAppear(t *testing.T) {
	w := newWorld(t)
	svc := startMeshService(t, w, shopID, startApp(t, echo).addr(), "")
	e := startGateway(t, w.identity(t, gatewayID), gatewayYAML(`
  - port: {number: 8446, name: https, protocol: HTTPS}
    hosts: ["shop.example.com"]
    tls: {mode: SIMPLE, credentialName: late-cert}
`)+tcpRouteYAML("shop", "shop.example.com", 8446, "127.0.0.1", svc.port), nil)
	cfg := &tls.Config{RootCAs: w.publicPool(), ServerName: "shop.example.com"}

	before := gatewayConns(8446, "shop/shop", ResultNoCredential)
	if _, err := tlsDial(t, e.addr(t, 8446), cfg); err == nil {
		t.Fatal("handshake without a loaded credential")
	}
	eventually(t, "no_credential counted", func() bool {
		return gatewayConns(8446, "shop/shop", ResultNoCredential)-before == 1
	})
	if err := e.gw.Ready(); err != nil {
		t.Errorf("a missing credential made the whole gateway unready: %v", err)
	}

	writeCredential(t, e.credDir, "late-cert", w.serverCert(t, "shop.example.com"), nil)
	eventually(t, "the credential served once its files appear", func() bool {
		conn, err := tlsDial(t, e.addr(t, 8446), cfg)
		return err == nil && roundTrip(conn, "ping\n") == nil
	})
}

func TestAdminAPIShowsGatewayConfigAndPeers(t *testing.T) {
	w := newWorld(t)
	svc := startMeshService(t, w, shopID, startApp(t, echo).addr(), "")
	src := w.identity(t, gatewayID)
	e := startGateway(t, src, gatewayYAML(`
  - port: {number: 7400, name: tcp, protocol: TCP}
    hosts: ["*"]
`)+tcpRouteYAML("shop", "*", 7400, "127.0.0.1", svc.port), nil)
	srv := httptest.NewServer(admin.Handler(src, e.gw, admin.WithLogger(quietLog)))
	defer srv.Close()
	get := func(path string, v any) {
		t.Helper()
		resp, err := http.Get(srv.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("GET %s: %s", path, resp.Status)
		}
		if err := json.NewDecoder(resp.Body).Decode(v); err != nil {
			t.Fatalf("GET %s: %v", path, err)
		}
	}

	conn := dial(t, e.addr(t, 7400))
	if err := roundTrip(conn, "ping\n"); err != nil {
		t.Fatal(err)
	}
	var peers []conntrack.PeerInfo
	get("/peers", &peers)
	if len(peers) != 1 || peers[0].PeerSPIFFEID != shopID || peers[0].Destination != fmt.Sprintf("127.0.0.1:%d", svc.port) {
		t.Errorf("/peers = %+v, want the connection to %s", peers, shopID)
	}

	var cfg struct {
		TrustDomain string `json:"trust_domain"`
		Listeners   []struct {
			Kind    string `json:"kind"`
			Address string `json:"address"`
		} `json:"listeners"`
		Policy struct {
			Gateway configView `json:"gateway"`
		} `json:"policy"`
	}
	get("/config", &cfg)
	if cfg.TrustDomain != "cluster.local" || len(cfg.Listeners) != 1 || cfg.Listeners[0].Kind != "gateway-tcp" ||
		cfg.Listeners[0].Address != e.addr(t, 7400) {
		t.Errorf("/config = %+v", cfg)
	}
	gv := cfg.Policy.Gateway
	if len(gv.Listeners) != 1 || len(gv.Listeners[0].Servers) != 1 || len(gv.Listeners[0].Servers[0].Routes) != 1 ||
		gv.Listeners[0].Servers[0].Routes[0].VirtualService != "shop/shop" {
		t.Errorf("/config gateway view = %+v, want port 7400 with route shop/shop", gv)
	}
	var id admin.Identity
	get("/identity", &id)
	if id.SPIFFEID != gatewayID {
		t.Errorf("/identity = %s, want %s", id.SPIFFEID, gatewayID)
	}
}

// shopDialer dials every NAME.shop:PORT destination at 127.0.0.1:PORT, as
// cluster DNS would resolve a Service of namespace shop.
type shopDialer struct{ net.Dialer }

func (d *shopDialer) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, err
	}
	if strings.HasSuffix(host, ".shop") {
		addr = net.JoinHostPort("127.0.0.1", port)
	}
	return d.Dialer.DialContext(ctx, network, addr)
}

// TestRouteWithoutPortUsesTheServicePort: a VirtualService destination
// without a port reaches its Service's only port, taken from the Service
// document beside it (as `kubectl apply -f` of one file would create).
func TestRouteWithoutPortUsesTheServicePort(t *testing.T) {
	w := newWorld(t)
	svc := startMeshService(t, w, shopID, startApp(t, echo).addr(), "")
	config := gatewayYAML(`
  - port: {number: 7000, name: tcp-shop, protocol: TCP}
    hosts: ["*"]
`) + fmt.Sprintf(`---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: shop}
spec:
  selector: {app: echo}
  ports: [{name: tcp, port: %d, targetPort: 8080}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: shop, namespace: shop}
spec:
  hosts: ["*"]
  gateways: [istio-system/ingress]
  tcp:
  - route: [{destination: {host: echo}}]
`, svc.port)
	e := startGateway(t, w.identity(t, gatewayID), config, nil, WithDialer(&shopDialer{}))
	if err := roundTrip(dial(t, e.addr(t, 7000)), "ping\n"); err != nil {
		t.Fatalf("route to the Service's port: %v", err)
	}
}
