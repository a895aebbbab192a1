package caclient

import (
	"crypto/tls"
	"net"
	"path/filepath"
	"sync/atomic"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"

	"github.com/meshproxy/meshproxy/internal/testpki"
)

// During a root rotation the CA moves its serving certificate to the new
// root; the client follows because it reads --ca-root anew for each request,
// and keeps the last good roots while the file is broken.
func TestIssueRereadsTheRootFile(t *testing.T) {
	rootA, rootB := testpki.New(t, "cluster.local"), testpki.New(t, "cluster.local")
	var serving atomic.Pointer[tls.Certificate]
	use := func(ca *testpki.CA) {
		c := testpki.TLSCertificate(ca.IssueLeaf(t, testpki.Leaf{ID: "spiffe://cluster.local/ns/istio-system/sa/istiod", DNSNames: []string{"localhost"}}))
		serving.Store(&c)
	}
	use(rootA)
	// No service is registered: a request that gets through TLS is answered
	// Unimplemented, one that does not fails Unavailable.
	gs := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{
		MinVersion:     tls.VersionTLS12,
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return serving.Load(), nil },
	})))
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = gs.Serve(lis) }()
	t.Cleanup(gs.Stop)

	file := filepath.Join(t.TempDir(), "root-cert.pem")
	testpki.WriteFile(t, file, testpki.PEMCerts(rootA.Root))
	c, err := New(lis.Addr().String(), WithRootFile(file), WithServerName("localhost"))
	if err != nil {
		t.Fatal(err)
	}
	reaches := func() codes.Code {
		_, err := c.Issue(ctxT(t), newCSR(t), 0)
		return status.Code(err)
	}
	steps := []struct {
		name string
		act  func()
		want codes.Code
	}{
		{"serving under the trusted root", func() {}, codes.Unimplemented},
		{"CA moved to a root not in the file", func() { use(rootB) }, codes.Unavailable},
		{"file now holds both roots", func() { testpki.WriteFile(t, file, testpki.PEMCerts(rootA.Root, rootB.Root)) }, codes.Unimplemented},
		{"file broken: last good roots kept", func() { testpki.WriteFile(t, file, []byte("garbage")) }, codes.Unimplemented},
		{"file holds only the old root", func() { testpki.WriteFile(t, file, testpki.PEMCerts(rootA.Root)) }, codes.Unavailable},
	}
	for _, s := range steps {
		s.act()
		if got := reaches(); got != s.want {
			t.Fatalf("%s: %s, want %s", s.name, got, s.want)
		}
	}
}
