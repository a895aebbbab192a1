package tlsmgr

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"strings"
	"testing"
	"time"

	"github.com/meshproxy/meshproxy/internal/testpki"
)

func TestInspectReportsPeerIdentityAndVerification(t *testing.T) {
	mesh := testpki.New(t, "cluster.local")
	other := testpki.New(t, "other.org")
	const id = "spiffe://cluster.local/ns/shop/sa/web"
	cert := testpki.TLSCertificate(mesh.Issue(t, id, time.Hour))
	srv := startServer(t, &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{cert},
		NextProtos:   []string{ALPNIstio},
	})
	addr := srv.ln.Addr().String()
	opts := InspectOptions{ALPN: []string{ALPNIstio}, Timeout: 30 * time.Second}

	r, err := Inspect(context.Background(), addr, []*x509.Certificate{mesh.Root}, opts)
	if err != nil {
		t.Fatalf("Inspect: %v", err)
	}
	if !r.Verified || r.SPIFFEID != id || r.ALPN != ALPNIstio || r.TLSVersion != "TLS 1.3" {
		t.Errorf("report = verified %t id %q alpn %q tls %q, want verified %s over istio, TLS 1.3", r.Verified, r.SPIFFEID, r.ALPN, r.TLSVersion, id)
	}
	if len(r.Chain) != 2 || !r.Chain[1].IsCA || len(r.Chain[0].URIs) != 1 || r.Chain[0].URIs[0] != id {
		t.Errorf("chain = %+v, want [leaf with URI SAN %s, intermediate]", r.Chain, id)
	}
	if r.ClientCertOK != nil {
		t.Error("client_cert_accepted reported without a client certificate")
	}

	r, err = Inspect(context.Background(), addr, []*x509.Certificate{other.Root}, opts)
	if err != nil {
		t.Fatalf("Inspect with foreign roots: %v", err)
	}
	if r.Verified || r.VerifyError == "" || r.SPIFFEID != id {
		t.Errorf("foreign roots: verified %t error %q id %q, want unverified with a reason and the ID still shown", r.Verified, r.VerifyError, r.SPIFFEID)
	}
}

func TestInspectRefusesNonSVIDAndUnreachablePeers(t *testing.T) {
	ca := testpki.New(t, "cluster.local")
	web := testpki.TLSCertificate(ca.IssueLeaf(t, testpki.Leaf{DNSNames: []string{"shop.example.com"}}))
	srv := startServer(t, &tls.Config{MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{web}})
	r, err := Inspect(context.Background(), srv.ln.Addr().String(), []*x509.Certificate{ca.Root}, InspectOptions{Timeout: 30 * time.Second})
	if err != nil {
		t.Fatalf("Inspect: %v", err)
	}
	if r.Verified || !strings.Contains(r.VerifyError, "not an SVID") {
		t.Errorf("DNS-only certificate: verified %t, error %q, want not an SVID", r.Verified, r.VerifyError)
	}

	addr := srv.ln.Addr().String()
	_ = srv.ln.Close()
	if _, err := Inspect(context.Background(), addr, []*x509.Certificate{ca.Root}, InspectOptions{Timeout: 30 * time.Second}); err == nil || !strings.Contains(err.Error(), addr) {
		t.Errorf("closed port: err = %v, want an error naming %s", err, addr)
	}
}
