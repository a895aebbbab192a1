package gateway

import (
	"crypto/tls"
	"fmt"
	"testing"

	"github.com/meshproxy/meshproxy/internal/testpki"
	"github.com/meshproxy/meshproxy/tlsmgr"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
)

// TestAutoPassthroughRoutesByOutboundSNI: as Istio's east-west gateway, an
// AUTO_PASSTHROUGH server forwards a client's TLS untouched to the service
// its SNI names, outbound_.PORT_._.HOST, with no VirtualService.
func TestAutoPassthroughRoutesByOutboundSNI(t *testing.T) {
	w := newWorld(t)
	backendCert := w.serverCert(t, "db.example.com")
	backend := startApp(t, tlsEcho(backendCert))
	e := startGateway(t, w.identity(t, gatewayID), gatewayYAML(`
  - port: {number: 15443, name: tls-eastwest, protocol: TLS}
    hosts: ["*"]
    tls: {mode: AUTO_PASSTHROUGH}
`), nil)
	sni := fmt.Sprintf("outbound_.%d_._.localhost", backend.port())
	conn, err := tlsDial(t, e.addr(t, 15443), &tls.Config{ServerName: sni, InsecureSkipVerify: true}) //nolint:gosec // the backend's own certificate is compared below
	if err != nil {
		t.Fatalf("handshake through the gateway: %v", err)
	}
	if !conn.ConnectionState().PeerCertificates[0].Equal(backendCert.Certificates[0]) {
		t.Error("the client did not see the backend's own certificate")
	}
	if err := roundTrip(conn, "east-west\n"); err != nil {
		t.Fatal(err)
	}
	// An SNI not of the outbound form has nowhere to go.
	before := gatewayConns(15443, routeNone, ResultNoRoute)
	if c, err := tlsDial(t, e.addr(t, 15443), &tls.Config{ServerName: "localhost", InsecureSkipVerify: true}); err == nil { //nolint:gosec // refused before any certificate
		c.Close()
		t.Error("a plain SNI got through an AUTO_PASSTHROUGH server")
	}
	eventually(t, "the refusal counted", func() bool { return gatewayConns(15443, routeNone, ResultNoRoute) > before })
}

// TestIstioMutualServerTakesMeshClientsOnly: an ISTIO_MUTUAL server
// terminates mesh mTLS with the gateway's SVID and routes as SIMPLE; a
// client without a mesh SVID is refused.
func TestIstioMutualServerTakesMeshClientsOnly(t *testing.T) {
	w := newWorld(t)
	svc := startMeshService(t, w, shopID, startApp(t, echo).addr(), "")
	e := startGateway(t, w.identity(t, gatewayID), gatewayYAML(`
  - port: {number: 15444, name: tls-mesh, protocol: TLS}
    hosts: ["*"]
    tls: {mode: ISTIO_MUTUAL}
`)+tcpRouteYAML("shop", "*", 15444, "127.0.0.1", svc.port), nil)
	client := tlsmgr.ClientConfig(w.identity(t, "spiffe://cluster.local/ns/remote/sa/client"), tlsconfig.AuthorizeID(mustID(t, gatewayID)))
	conn, err := tlsDial(t, e.addr(t, 15444), client)
	if err != nil {
		t.Fatalf("mesh mTLS into the gateway: %v", err)
	}
	if err := roundTrip(conn, "ping\n"); err != nil {
		t.Fatalf("through the gateway to the mesh service: %v", err)
	}
	// A TLS client without a mesh certificate.
	outsider := testpki.New(t, "cluster.local").Issue(t, otherID, 0)
	cfg := &tls.Config{Certificates: []tls.Certificate{testpki.TLSCertificate(outsider)}, InsecureSkipVerify: true, NextProtos: []string{"istio"}} //nolint:gosec // the server's refusal is what is tested
	if c, err := tlsDial(t, e.addr(t, 15444), cfg); err == nil {
		if roundTrip(c, "ping\n") == nil {
			t.Error("a client of another CA got through an ISTIO_MUTUAL server")
		}
		c.Close()
	}
}

func mustID(t *testing.T, s string) spiffeid.ID {
	t.Helper()
	id, err := spiffeid.FromString(s)
	if err != nil {
		t.Fatal(err)
	}
	return id
}
