package googlecastest

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"cloud.google.com/go/security/privateca/apiv1/privatecapb"
	"google.golang.org/api/option"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/meshproxy/meshproxy/internal/testpki"
)

// The service account the fake trusts.
const (
	ClientEmail = "meshproxy-ca@meshproxy-test.iam.gserviceaccount.com"
	keyID       = "0123456789abcdef0123456789abcdef01234567"
	scope       = "https://www.googleapis.com/auth/cloud-platform"
)

// Server is a fake CAS with one pool holding one CA.
type Server struct {
	Addr      string // 127.0.0.1:PORT
	Pool      string // projects/P/locations/L/caPools/POOL
	CAID      string // the pool's CA
	PKI       *testpki.CA
	saKey     *rsa.PrivateKey
	tlsRoots  *x509.CertPool
	srv       *grpc.Server
	mu        sync.Mutex
	state     state
	calls     []*privatecapb.CreateCertificateRequest
	byRequest map[string]*privatecapb.Certificate

	privatecapb.UnimplementedCertificateAuthorityServiceServer
}

type state struct {
	throttle int  // CreateCertificate calls still to answer ResourceExhausted
	stripURI bool // the template drops the URI SANs
	fail     error
}

// Start runs the fake and points Application Default Credentials at a
// service account key it trusts (GOOGLE_APPLICATION_CREDENTIALS, for the
// test's duration).
func Start(t *testing.T, pki *testpki.CA) *Server {
	t.Helper()
	s := &Server{
		Pool:      "projects/meshproxy-test/locations/europe-west1/caPools/mesh",
		CAID:      "mesh-ca-1",
		PKI:       pki,
		byRequest: map[string]*privatecapb.Certificate{},
	}
	var err error
	if s.saKey, err = rsa.GenerateKey(rand.Reader, 2048); err != nil {
		t.Fatal(err)
	}
	serverCert, roots := selfSigned(t)
	s.tlsRoots = roots
	s.srv = grpc.NewServer(
		grpc.Creds(credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{serverCert}, MinVersion: tls.VersionTLS12})),
		grpc.UnaryInterceptor(s.authenticate),
	)
	privatecapb.RegisterCertificateAuthorityServiceServer(s.srv, s)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s.Addr = lis.Addr().String()
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = s.srv.Serve(lis)
	}()
	t.Cleanup(func() {
		s.srv.Stop()
		<-done
	})
	keyDER, err := x509.MarshalPKCS8PrivateKey(s.saKey)
	if err != nil {
		t.Fatal(err)
	}
	sa, err := json.Marshal(map[string]string{
		"type":            "service_account",
		"project_id":      "meshproxy-test",
		"private_key_id":  keyID,
		"private_key":     string(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER})),
		"client_email":    ClientEmail,
		"client_id":       "100000000000000000001",
		"token_uri":       "https://oauth2.invalid/token", // self-signed JWTs need no token exchange
		"universe_domain": "googleapis.com",
	})
	if err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(t.TempDir(), "service-account.json")
	if err := os.WriteFile(file, sa, 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("GOOGLE_APPLICATION_CREDENTIALS", file)
	t.Setenv("GOOGLE_CLOUD_UNIVERSE_DOMAIN", "")
	return s
}

// ClientOptions point a CAS client at the fake and trust its TLS
// certificate.
func (s *Server) ClientOptions() []option.ClientOption {
	return []option.ClientOption{
		option.WithGRPCDialOption(grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{RootCAs: s.tlsRoots, MinVersion: tls.VersionTLS12}))),
	}
}

// Stop stops the server: calls then fail to connect.
func (s *Server) Stop() { s.srv.Stop() }

// Throttle answers the next n CreateCertificate calls with
// ResourceExhausted, as CAS does when a request quota is used up.
func (s *Server) Throttle(n int) { s.with(func(st *state) { st.throttle = n }) }

// StripURISAN makes issued certificates lack URI SANs, as a template whose
// identity constraints do not pass SANs through.
func (s *Server) StripURISAN(on bool) { s.with(func(st *state) { st.stripURI = on }) }

// Fail answers every call with err (a status error; nil: stop failing).
func (s *Server) Fail(err error) { s.with(func(st *state) { st.fail = err }) }

// Calls returns the CreateCertificate requests received so far.
func (s *Server) Calls() []*privatecapb.CreateCertificateRequest {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]*privatecapb.CreateCertificateRequest(nil), s.calls...)
}

// Issued is how many distinct certificates were issued.
func (s *Server) Issued() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.byRequest)
}

func (s *Server) with(f func(*state)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	f(&s.state)
}

// FetchCaCerts implements the service: the pool's CA chains.
func (s *Server) FetchCaCerts(_ context.Context, req *privatecapb.FetchCaCertsRequest) (*privatecapb.FetchCaCertsResponse, error) {
	s.mu.Lock()
	fail := s.state.fail
	s.mu.Unlock()
	if fail != nil {
		return nil, fail
	}
	if req.GetCaPool() != s.Pool {
		return nil, status.Errorf(codes.NotFound, "Resource '%s' was not found", req.GetCaPool())
	}
	return &privatecapb.FetchCaCertsResponse{CaCerts: []*privatecapb.FetchCaCertsResponse_CertChain{
		{Certificates: []string{pemString(s.PKI.Intermediate), pemString(s.PKI.Root)}},
	}}, nil
}

// CreateCertificate implements the service for certificates described by
// a config (public key, SANs, key usages) or a PEM CSR.
func (s *Server) CreateCertificate(_ context.Context, req *privatecapb.CreateCertificateRequest) (*privatecapb.Certificate, error) {
	s.mu.Lock()
	s.calls = append(s.calls, req)
	st := s.state
	if s.state.throttle > 0 {
		s.state.throttle--
		st.fail = status.Error(codes.ResourceExhausted,
			"Quota exceeded for quota metric 'Certificate creation requests' and limit 'Certificate creation requests per minute per region'")
	}
	prev := s.byRequest[req.GetRequestId()]
	s.mu.Unlock()
	if st.fail != nil {
		return nil, st.fail
	}
	if req.GetParent() != s.Pool {
		return nil, status.Errorf(codes.NotFound, "Resource '%s' was not found", req.GetParent())
	}
	if id := req.GetIssuingCertificateAuthorityId(); id != "" && id != s.CAID {
		return nil, status.Errorf(codes.NotFound, "Resource '%s/certificateAuthorities/%s' was not found", s.Pool, id)
	}
	if prev != nil {
		return prev, nil // same request ID: the same certificate, as CAS does
	}
	cert := req.GetCertificate()
	life := cert.GetLifetime().AsDuration()
	if life <= 0 {
		return nil, status.Error(codes.InvalidArgument, "certificate.lifetime must be positive")
	}
	now := time.Now()
	if now.Add(life).After(s.PKI.Intermediate.NotAfter) {
		return nil, status.Error(codes.FailedPrecondition, "the requested lifetime exceeds the lifetime of the issuing CA")
	}
	serial, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
	tmpl := &x509.Certificate{SerialNumber: serial, NotBefore: now, NotAfter: now.Add(life), BasicConstraintsValid: true}
	var pub any
	switch c := cert.GetCertificateConfig().(type) {
	case *privatecapb.Certificate_Config:
		block, _ := pem.Decode(c.Config.GetPublicKey().GetKey())
		if block == nil || c.Config.GetPublicKey().GetFormat() != privatecapb.PublicKey_PEM {
			return nil, status.Error(codes.InvalidArgument, "config.public_key must be a PEM public key")
		}
		k, err := x509.ParsePKIXPublicKey(block.Bytes)
		if err != nil {
			return nil, status.Errorf(codes.InvalidArgument, "config.public_key: %v", err)
		}
		pub = k
		san := c.Config.GetSubjectConfig().GetSubjectAltName()
		for _, u := range san.GetUris() {
			parsed, err := url.Parse(u)
			if err != nil {
				return nil, status.Errorf(codes.InvalidArgument, "subject_alt_name.uris: %v", err)
			}
			tmpl.URIs = append(tmpl.URIs, parsed)
		}
		tmpl.DNSNames = san.GetDnsNames()
		for _, ip := range san.GetIpAddresses() {
			tmpl.IPAddresses = append(tmpl.IPAddresses, net.ParseIP(ip))
		}
		ku := c.Config.GetX509Config().GetKeyUsage()
		if ku.GetBaseKeyUsage().GetDigitalSignature() {
			tmpl.KeyUsage |= x509.KeyUsageDigitalSignature
		}
		if ku.GetBaseKeyUsage().GetKeyEncipherment() {
			tmpl.KeyUsage |= x509.KeyUsageKeyEncipherment
		}
		if ku.GetExtendedKeyUsage().GetServerAuth() {
			tmpl.ExtKeyUsage = append(tmpl.ExtKeyUsage, x509.ExtKeyUsageServerAuth)
		}
		if ku.GetExtendedKeyUsage().GetClientAuth() {
			tmpl.ExtKeyUsage = append(tmpl.ExtKeyUsage, x509.ExtKeyUsageClientAuth)
		}
		tmpl.IsCA = c.Config.GetX509Config().GetCaOptions().GetIsCa()
	case *privatecapb.Certificate_PemCsr:
		block, _ := pem.Decode([]byte(c.PemCsr))
		if block == nil {
			return nil, status.Error(codes.InvalidArgument, "pem_csr is not PEM")
		}
		csr, err := x509.ParseCertificateRequest(block.Bytes)
		if err != nil || csr.CheckSignature() != nil {
			return nil, status.Error(codes.InvalidArgument, "pem_csr could not be parsed or its signature is invalid")
		}
		pub, tmpl.URIs, tmpl.DNSNames, tmpl.IPAddresses = csr.PublicKey, csr.URIs, csr.DNSNames, csr.IPAddresses
		tmpl.KeyUsage = x509.KeyUsageDigitalSignature
	default:
		return nil, status.Error(codes.InvalidArgument, "certificate needs a config or a pem_csr")
	}
	if st.stripURI {
		tmpl.URIs = nil
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, s.PKI.Intermediate, pub, s.PKI.IntermediateKey)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "signing: %v", err)
	}
	out := &privatecapb.Certificate{
		Name:                       s.Pool + "/certificates/" + req.GetCertificateId(),
		IssuerCertificateAuthority: s.Pool + "/certificateAuthorities/" + s.CAID,
		Lifetime:                   cert.GetLifetime(),
		PemCertificate:             string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})),
		PemCertificateChain:        []string{pemString(s.PKI.Intermediate), pemString(s.PKI.Root)},
	}
	s.mu.Lock()
	s.byRequest[req.GetRequestId()] = out
	s.mu.Unlock()
	return out, nil
}

// authenticate checks the bearer token of every call: a JWT the service
// account signed itself (RS256, its key ID, issuer and subject its email,
// the cloud-platform scope or CAS's audience, not expired).
func (s *Server) authenticate(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	var auth string
	if v := md.Get("authorization"); len(v) == 1 {
		auth = v[0]
	}
	tok, ok := strings.CutPrefix(auth, "Bearer ")
	if !ok {
		return nil, status.Error(codes.Unauthenticated, "Request is missing required authentication credential.")
	}
	if err := s.verifyJWT(tok); err != nil {
		return nil, status.Errorf(codes.Unauthenticated, "Request had invalid authentication credentials: %v", err)
	}
	return handler(ctx, req)
}

func (s *Server) verifyJWT(tok string) error {
	parts := strings.Split(tok, ".")
	if len(parts) != 3 {
		return fmt.Errorf("not a JWT")
	}
	var header struct{ Alg, Kid string }
	var claims struct {
		Iss, Sub, Scope, Aud string
		Exp, Iat             int64
	}
	for i, v := range []any{&header, &claims} {
		raw, err := base64.RawURLEncoding.DecodeString(parts[i])
		if err != nil {
			return err
		}
		if err := json.Unmarshal(raw, v); err != nil {
			return err
		}
	}
	if header.Alg != "RS256" || header.Kid != keyID {
		return fmt.Errorf("alg %q kid %q", header.Alg, header.Kid)
	}
	sig, err := base64.RawURLEncoding.DecodeString(parts[2])
	if err != nil {
		return err
	}
	sum := sha256.Sum256([]byte(parts[0] + "." + parts[1]))
	if err := rsa.VerifyPKCS1v15(&s.saKey.PublicKey, crypto.SHA256, sum[:], sig); err != nil {
		return fmt.Errorf("signature: %w", err)
	}
	if claims.Iss != ClientEmail || claims.Sub != ClientEmail {
		return fmt.Errorf("issuer %q subject %q", claims.Iss, claims.Sub)
	}
	if !strings.Contains(claims.Scope, scope) && claims.Aud != "https://privateca.googleapis.com/" {
		return fmt.Errorf("scope %q audience %q", claims.Scope, claims.Aud)
	}
	if now := time.Now().Unix(); claims.Exp < now || claims.Iat > now+300 {
		return fmt.Errorf("token expired or issued in the future")
	}
	return nil
}

func pemString(c *x509.Certificate) string {
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw}))
}

// selfSigned makes the fake's TLS certificate for 127.0.0.1 and a pool
// trusting it.
func selfSigned(t *testing.T) (tls.Certificate, *x509.CertPool) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
		DNSNames:     []string{"localhost"},
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(c)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: c}, pool
}
