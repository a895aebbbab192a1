package caclient

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"math/big"
	"net"
	"net/url"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	pb "istio.io/api/security/v1alpha1"

	"github.com/meshproxy/meshproxy/internal/testpki"
	"github.com/meshproxy/meshproxy/tlsmgr"
)

const (
	caName     = "istiod.istio-system.svc"
	workloadID = "spiffe://cluster.local/ns/default/sa/web"
)

// testCA is a real gRPC IstioCertificateService over TLS on loopback. It
// authenticates by bearer token (token → SPIFFE ID) or by a client SVID,
// and signs the CSR for that identity.
type testCA struct {
	pb.UnimplementedIstioCertificateServiceServer
	ca       *testpki.CA
	tokens   map[string]string
	addr     string
	rootFile string

	mu      sync.Mutex
	seen    []string // authorization headers, in order
	peerIDs []string // SVIDs presented by callers
}

func startTestCA(t *testing.T) *testCA {
	t.Helper()
	ca := testpki.New(t, "cluster.local")
	serving := ca.IssueLeaf(t, testpki.Leaf{ID: "spiffe://cluster.local/ns/istio-system/sa/istiod", DNSNames: []string{caName, "localhost"}})
	pool := x509.NewCertPool()
	pool.AddCert(ca.Root)
	creds := credentials.NewTLS(&tls.Config{
		MinVersion:   tls.VersionTLS12,
		Certificates: []tls.Certificate{testpki.TLSCertificate(serving)},
		ClientAuth:   tls.VerifyClientCertIfGiven,
		ClientCAs:    pool,
	})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &testCA{ca: ca, tokens: map[string]string{"tok-1": workloadID, "tok-2": workloadID}, addr: ln.Addr().String()}
	s.rootFile = filepath.Join(t.TempDir(), "root-cert.pem")
	testpki.WriteFile(t, s.rootFile, testpki.PEMCerts(ca.Root))
	srv := grpc.NewServer(grpc.Creds(creds))
	pb.RegisterIstioCertificateServiceServer(srv, s)
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(srv.Stop)
	return s
}

func (s *testCA) CreateCertificate(ctx context.Context, req *pb.IstioCertificateRequest) (*pb.IstioCertificateResponse, error) {
	id := ""
	if p, ok := peer.FromContext(ctx); ok {
		if info, ok := p.AuthInfo.(credentials.TLSInfo); ok && len(info.State.VerifiedChains) > 0 {
			svid, err := x509svid.IDFromCert(info.State.VerifiedChains[0][0])
			if err == nil {
				id = svid.String()
				s.mu.Lock()
				s.peerIDs = append(s.peerIDs, id)
				s.mu.Unlock()
			}
		}
	}
	md, _ := metadata.FromIncomingContext(ctx)
	if auth := md.Get("authorization"); len(auth) > 0 {
		s.mu.Lock()
		s.seen = append(s.seen, auth[0])
		s.mu.Unlock()
		tokID, ok := s.tokens[strings.TrimPrefix(auth[0], "Bearer ")]
		if !ok || !strings.HasPrefix(auth[0], "Bearer ") {
			return nil, status.Error(codes.Unauthenticated, "unknown token")
		}
		id = tokID
	}
	if id == "" {
		return nil, status.Error(codes.Unauthenticated, "no token and no client certificate")
	}
	block, _ := pem.Decode([]byte(req.GetCsr()))
	if block == nil || block.Type != "CERTIFICATE REQUEST" {
		return nil, status.Error(codes.InvalidArgument, "csr is not PEM")
	}
	csr, err := x509.ParseCertificateRequest(block.Bytes)
	if err != nil || csr.CheckSignature() != nil {
		return nil, status.Error(codes.InvalidArgument, "bad csr")
	}
	ttl := time.Duration(req.GetValidityDuration()) * time.Second
	if ttl <= 0 {
		ttl = time.Hour
	}
	serial, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
	u, _ := url.Parse(id)
	der, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{
		SerialNumber:          serial,
		NotBefore:             time.Now().Add(-2 * time.Minute),
		NotAfter:              time.Now().Add(ttl),
		URIs:                  []*url.URL{u},
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
	}, s.ca.Intermediate, csr.PublicKey, s.ca.IntermediateKey)
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	leaf := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	return &pb.IstioCertificateResponse{CertChain: []string{
		string(leaf), string(testpki.PEMCerts(s.ca.Intermediate)), string(testpki.PEMCerts(s.ca.Root)),
	}}, nil
}

func (s *testCA) authHeaders() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.seen...)
}

func newCSR(t *testing.T) []byte {
	t.Helper()
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, testpki.NewKey(t))
	if err != nil {
		t.Fatal(err)
	}
	return der
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestIssueRereadsTokenFileOnEveryRequest(t *testing.T) {
	ca := startTestCA(t)
	tokenFile := filepath.Join(t.TempDir(), "istio-token")
	testpki.WriteFile(t, tokenFile, []byte("tok-1"))
	c, err := New(ca.addr, WithRootFile(ca.rootFile), WithServerName(caName), WithTokenFile(tokenFile))
	if err != nil {
		t.Fatal(err)
	}
	issued, err := c.Issue(ctxT(t), newCSR(t), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	// The projected token rotates: the next request must carry the new one.
	testpki.WriteFile(t, tokenFile, []byte("tok-2\n"))
	if _, err := c.Issue(ctxT(t), newCSR(t), time.Hour); err != nil {
		t.Fatal(err)
	}
	if got, want := ca.authHeaders(), []string{"Bearer tok-1", "Bearer tok-2"}; strings.Join(got, ",") != strings.Join(want, ",") {
		t.Fatalf("CA saw authorization %q, want %q", got, want)
	}
	if len(issued.Chain) != 2 || len(issued.Roots) != 1 || !issued.Roots[0].Equal(ca.ca.Root) || !issued.Chain[1].Equal(ca.ca.Intermediate) {
		t.Fatalf("issued chain %d certs, roots %d: want [leaf, intermediate] and the root", len(issued.Chain), len(issued.Roots))
	}
	if id, err := x509svid.IDFromCert(issued.Chain[0]); err != nil || id.String() != workloadID {
		t.Fatalf("leaf id %v, %v", id, err)
	}
	if got := issued.Chain[0].NotAfter.Sub(issued.Chain[0].NotBefore); got != time.Hour+2*time.Minute {
		t.Fatalf("leaf lifetime %s: validity_duration not sent as seconds", got)
	}
}

func TestIssueErrorsKeepTheGRPCStatus(t *testing.T) {
	ca := startTestCA(t)
	dir := t.TempDir()
	tests := []struct {
		name  string
		token string
		csr   []byte
		want  codes.Code
	}{
		{"unknown token", "nope", nil, codes.Unauthenticated},
		{"garbage csr", "tok-1", []byte("not a csr"), codes.InvalidArgument},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tokenFile := filepath.Join(dir, "token-"+tt.want.String())
			testpki.WriteFile(t, tokenFile, []byte(tt.token))
			c, err := New(ca.addr, WithRootFile(ca.rootFile), WithServerName(caName), WithTokenFile(tokenFile))
			if err != nil {
				t.Fatal(err)
			}
			csr := tt.csr
			if csr == nil {
				csr = newCSR(t)
			}
			_, err = c.Issue(ctxT(t), csr, time.Hour)
			if status.Code(err) != tt.want {
				t.Fatalf("status.Code(%v) = %s, want %s", err, status.Code(err), tt.want)
			}
			if !strings.Contains(err.Error(), tt.want.String()) || !strings.Contains(err.Error(), ca.addr) {
				t.Fatalf("error %q should show the code %s and the CA address", err, tt.want)
			}
		})
	}
}

func TestCAServerNameIsVerified(t *testing.T) {
	ca := startTestCA(t)
	csr := newCSR(t)
	tokenFile := filepath.Join(t.TempDir(), "token")
	testpki.WriteFile(t, tokenFile, []byte("tok-1"))

	// Default: the address host (127.0.0.1) is not in istiod's certificate.
	c, err := New(ca.addr, WithRootFile(ca.rootFile), WithTokenFile(tokenFile))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Issue(ctxT(t), csr, time.Hour); err == nil || !strings.Contains(err.Error(), "127.0.0.1") {
		t.Fatalf("CA certificate without the address host accepted (err %v)", err)
	}
	// A root that did not sign the CA's certificate.
	other := testpki.New(t, "cluster.local")
	c, err = New(ca.addr, WithRoots(other.Root), WithServerName(caName), WithTokenFile(tokenFile))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Issue(ctxT(t), csr, time.Hour); err == nil || status.Code(err) != codes.Unavailable {
		t.Fatalf("CA certificate from an unknown root accepted (err %v)", err)
	}
}

func TestClientPresentsCurrentSVIDForRenewal(t *testing.T) {
	ca := startTestCA(t)
	valid := tlsmgr.NewStatic(ca.ca.Issue(t, workloadID, time.Hour), ca.ca.Bundle())
	expired := tlsmgr.NewStatic(ca.ca.IssueLeaf(t, testpki.Leaf{ID: workloadID, NotBefore: time.Now().Add(-2 * time.Hour), TTL: time.Hour}), ca.ca.Bundle())

	c, err := New(ca.addr, WithRootFile(ca.rootFile), WithServerName(caName), WithClientCertificate(valid.Certificate))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Issue(ctxT(t), newCSR(t), time.Hour); err != nil {
		t.Fatalf("renewal by SVID: %v", err)
	}
	ca.mu.Lock()
	ids := append([]string(nil), ca.peerIDs...)
	ca.mu.Unlock()
	if len(ids) != 1 || ids[0] != workloadID {
		t.Fatalf("CA saw client SVIDs %v, want [%s]", ids, workloadID)
	}

	// An expired SVID is not presented (the CA would refuse the handshake).
	c, err = New(ca.addr, WithRootFile(ca.rootFile), WithServerName(caName), WithClientCertificate(expired.Certificate))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Issue(ctxT(t), newCSR(t), time.Hour); status.Code(err) != codes.Unauthenticated {
		t.Fatalf("with an expired SVID: err = %v, want Unauthenticated (no certificate presented)", err)
	}
}

// TestRotatorObtainsIdentityFromCA wires the client into a Rotator, the
// way `meshproxy run --ca-addr` does.
func TestRotatorObtainsIdentityFromCA(t *testing.T) {
	ca := startTestCA(t)
	tokenFile := filepath.Join(t.TempDir(), "token")
	testpki.WriteFile(t, tokenFile, []byte("tok-1"))
	var rot *tlsmgr.Rotator
	c, err := New(ca.addr, WithRootFile(ca.rootFile), WithServerName(caName), WithTokenFile(tokenFile),
		WithClientCertificate(func() (*tls.Certificate, error) { return rot.Certificate() }))
	if err != nil {
		t.Fatal(err)
	}
	rot, err = tlsmgr.NewRotator(c, tlsmgr.WithTrustDomain(spiffeid.RequireTrustDomainFromString("cluster.local")), tlsmgr.WithTTL(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	for range 2 { // the second renewal also presents the first SVID
		if err := rot.Rotate(ctxT(t)); err != nil {
			t.Fatal(err)
		}
	}
	if err := rot.Ready(); err != nil {
		t.Fatal(err)
	}
	st := rot.Status()
	if st.ID.String() != workloadID || st.Source != "ca" || len(st.Bundles) != 1 || !st.Bundles[0].HasX509Authority(ca.ca.Root) {
		t.Fatalf("status = %+v", st)
	}
	ca.mu.Lock()
	defer ca.mu.Unlock()
	if len(ca.peerIDs) != 1 {
		t.Fatalf("CA saw %d client SVIDs, want 1 (on the renewal only)", len(ca.peerIDs))
	}
}

func TestNewRejectsBadConfigurationNamingIt(t *testing.T) {
	dir := t.TempDir()
	ca := testpki.New(t, "cluster.local")
	root := filepath.Join(dir, "root.pem")
	testpki.WriteFile(t, root, testpki.PEMCerts(ca.Root))
	garbage := filepath.Join(dir, "garbage.pem")
	testpki.WriteFile(t, garbage, []byte("nope"))
	empty := filepath.Join(dir, "empty-token")
	testpki.WriteFile(t, empty, []byte("\n"))
	spaced := filepath.Join(dir, "spaced-token")
	testpki.WriteFile(t, spaced, []byte("a b"))
	missing := filepath.Join(dir, "missing")

	tests := []struct {
		name string
		addr string
		opts []Option
		want string
	}{
		{"address without port", "istiod", []Option{WithRootFile(root)}, `"istiod"`},
		{"address with bad port", "istiod:http", []Option{WithRootFile(root)}, "invalid port"},
		{"address without host", ":15012", []Option{WithRootFile(root)}, "empty host"},
		{"no root", "istiod:15012", nil, "no CA root"},
		{"missing root file", "istiod:15012", []Option{WithRootFile(missing)}, missing},
		{"root file without certificates", "istiod:15012", []Option{WithRootFile(garbage)}, garbage},
		{"missing token file", "istiod:15012", []Option{WithRootFile(root), WithTokenFile(missing)}, missing},
		{"empty token file", "istiod:15012", []Option{WithRootFile(root), WithTokenFile(empty)}, empty},
		{"token with whitespace", "istiod:15012", []Option{WithRootFile(root), WithTokenFile(spaced)}, spaced},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := New(tt.addr, tt.opts...)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("New err = %v, want it to mention %q", err, tt.want)
			}
		})
	}
}

func TestParseCertChainLayouts(t *testing.T) {
	ca := testpki.New(t, "cluster.local")
	next := testpki.New(t, "cluster.local")
	leaf := ca.Issue(t, workloadID, time.Hour).Certificates[0]
	p := func(c ...*x509.Certificate) string { return string(testpki.PEMCerts(c...)) }
	tests := []struct {
		name      string
		in        []string
		wantChain []*x509.Certificate
		wantRoots []*x509.Certificate
		wantErr   string
	}{
		{"leaf, intermediate, root", []string{p(leaf), p(ca.Intermediate), p(ca.Root)},
			[]*x509.Certificate{leaf, ca.Intermediate}, []*x509.Certificate{ca.Root}, ""},
		{"leaf with intermediate in one element", []string{p(leaf, ca.Intermediate), p(ca.Root)},
			[]*x509.Certificate{leaf, ca.Intermediate}, []*x509.Certificate{ca.Root}, ""},
		{"two roots during root rotation", []string{p(leaf), p(ca.Intermediate), p(ca.Root, next.Root)},
			[]*x509.Certificate{leaf, ca.Intermediate}, []*x509.Certificate{ca.Root, next.Root}, ""},
		{"everything in one element", []string{p(leaf, ca.Intermediate, ca.Root)},
			[]*x509.Certificate{leaf, ca.Intermediate}, []*x509.Certificate{ca.Root}, ""},
		{"root repeated in the chain", []string{p(leaf, ca.Intermediate, ca.Root), p(ca.Root)},
			[]*x509.Certificate{leaf, ca.Intermediate}, []*x509.Certificate{ca.Root}, ""},
		{"leaf only", []string{p(leaf)}, []*x509.Certificate{leaf}, nil, ""},
		{"empty", nil, nil, nil, "empty cert_chain"},
		{"garbage element", []string{p(leaf), "garbage"}, nil, nil, "cert_chain[1]"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseCertChain(tt.in)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err = %v, want %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !sameCerts(got.Chain, tt.wantChain) || !sameCerts(got.Roots, tt.wantRoots) {
				t.Fatalf("chain %d / roots %d certs, want %d / %d", len(got.Chain), len(got.Roots), len(tt.wantChain), len(tt.wantRoots))
			}
		})
	}
}

func sameCerts(a, b []*x509.Certificate) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if !a[i].Equal(b[i]) {
			return false
		}
	}
	return true
}
