package caclient

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	pb "istio.io/api/security/v1alpha1"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"

	"github.com/meshproxy/meshproxy/internal/fileread"
	"github.com/meshproxy/meshproxy/tlsmgr"
)

// Option configures a Client.
type Option func(*options)

type options struct {
	rootFile   string
	roots      []*x509.Certificate
	serverName string
	tokenFile  string
	clientCert func() (*tls.Certificate, error)
	dialOpts   []grpc.DialOption
}

// WithRootFile trusts the PEM root(s) in path for the CA's serving
// certificate (--ca-root). One of WithRootFile or WithRoots is required.
func WithRootFile(path string) Option { return func(o *options) { o.rootFile = path } }

// WithRoots trusts roots for the CA's serving certificate.
func WithRoots(roots ...*x509.Certificate) Option {
	return func(o *options) { o.roots = append(o.roots, roots...) }
}

// WithServerName sets the name the CA's certificate must carry; the default
// is the host of the address (istiod's certificate names, among others,
// istiod.istio-system.svc).
func WithServerName(name string) Option { return func(o *options) { o.serverName = name } }

// WithTokenFile sends the token in path as "authorization: Bearer <token>"
// with every request, reading the file anew each time.
func WithTokenFile(path string) Option { return func(o *options) { o.tokenFile = path } }

// WithClientCertificate presents the certificate cert returns (normally the
// current SVID, e.g. rotator.Certificate) as TLS client certificate, so the
// CA can authenticate a renewal by SVID. Nothing is presented while cert
// fails or its certificate has expired.
func WithClientCertificate(cert func() (*tls.Certificate, error)) Option {
	return func(o *options) { o.clientCert = cert }
}

// WithDialOptions adds gRPC dial options (after the client's own).
func WithDialOptions(opts ...grpc.DialOption) Option {
	return func(o *options) { o.dialOpts = append(o.dialOpts, opts...) }
}

// Client requests certificates from an Istio-compatible CA. It implements
// tlsmgr.Issuer. Each request uses a fresh connection: renewals are rare,
// and a new handshake presents the current SVID and re-resolves the address.
// The root file is read anew for each request too (when it changed), so the
// CA may move its serving certificate to a new root during a root rotation.
type Client struct {
	addr        string
	tokenFile   string
	rootFile    string
	staticRoots []*x509.Certificate
	dialOpts    []grpc.DialOption

	mu        sync.Mutex
	rootData  []byte      // root file content tlsConfig was built from
	tlsConfig *tls.Config // last good
}

var _ tlsmgr.Issuer = (*Client)(nil)

// New returns a Client for the CA at addr (HOST:PORT). It checks the root
// file and, if given, the token file now, so a misconfiguration fails at
// start; the error names the file.
func New(addr string, opts ...Option) (*Client, error) {
	var o options
	for _, opt := range opts {
		opt(&o)
	}
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, fmt.Errorf("ca address %q: %w", addr, err)
	}
	if host == "" {
		return nil, fmt.Errorf("ca address %q: empty host", addr)
	}
	if p, err := strconv.Atoi(port); err != nil || p < 1 || p > 65535 {
		return nil, fmt.Errorf("ca address %q: invalid port %q", addr, port)
	}
	roots := append([]*x509.Certificate(nil), o.roots...)
	var rootData []byte
	if o.rootFile != "" {
		data, certs, err := readRoots(o.rootFile)
		if err != nil {
			return nil, err
		}
		roots, rootData = append(roots, certs...), data
	}
	if len(roots) == 0 {
		return nil, errors.New("no CA root configured (WithRootFile or WithRoots)")
	}
	if o.tokenFile != "" {
		if _, err := readToken(o.tokenFile); err != nil {
			return nil, err
		}
	}
	pool := x509.NewCertPool()
	for _, r := range roots {
		pool.AddCert(r)
	}
	serverName := o.serverName
	if serverName == "" {
		serverName = host
	}
	cfg := &tls.Config{
		MinVersion: tls.VersionTLS12,
		RootCAs:    pool,
		ServerName: serverName,
	}
	if o.clientCert != nil {
		get := o.clientCert
		cfg.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			c, err := get()
			if err != nil || c == nil || (c.Leaf != nil && !time.Now().Before(c.Leaf.NotAfter)) {
				return &tls.Certificate{}, nil // no usable SVID: present none
			}
			return c, nil
		}
	}
	return &Client{addr: addr, tokenFile: o.tokenFile, rootFile: o.rootFile, staticRoots: o.roots,
		rootData: rootData, tlsConfig: cfg, dialOpts: o.dialOpts}, nil
}

func readRoots(path string) ([]byte, []*x509.Certificate, error) {
	data, err := fileread.Read(path, fileread.MaxPEM)
	if err != nil {
		return nil, nil, fmt.Errorf("ca root file: %w", err)
	}
	certs, err := tlsmgr.ParseCertificatesPEM(data)
	if err != nil {
		return nil, nil, fmt.Errorf("ca root file %s: %w", path, err)
	}
	return data, certs, nil
}

// currentTLSConfig is the TLS config with the roots of the root file as it
// is now; while the file is unreadable or invalid, the last good roots stay.
func (c *Client) currentTLSConfig() *tls.Config {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.rootFile == "" {
		return c.tlsConfig
	}
	data, certs, err := readRoots(c.rootFile)
	if err != nil || bytes.Equal(data, c.rootData) {
		return c.tlsConfig
	}
	pool := x509.NewCertPool()
	for _, r := range append(slices.Clone(c.staticRoots), certs...) {
		pool.AddCert(r)
	}
	cfg := c.tlsConfig.Clone()
	cfg.RootCAs = pool
	c.tlsConfig, c.rootData = cfg, data
	return cfg
}

// Issue sends csrDER to the CA asking for ttl (≤ 0: the CA's default) and
// returns the chain and roots it answered with. gRPC errors keep their
// status (status.Code works on the returned error).
func (c *Client) Issue(ctx context.Context, csrDER []byte, ttl time.Duration) (*tlsmgr.Issued, error) {
	if c.tokenFile != "" {
		tok, err := readToken(c.tokenFile)
		if err != nil {
			return nil, err
		}
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+tok)
	}
	dialOpts := append([]grpc.DialOption{grpc.WithTransportCredentials(credentials.NewTLS(c.currentTLSConfig()))}, c.dialOpts...)
	conn, err := grpc.NewClient(c.addr, dialOpts...)
	if err != nil {
		return nil, fmt.Errorf("connect to ca %s: %w", c.addr, err)
	}
	defer conn.Close()
	req := &pb.IstioCertificateRequest{
		Csr:              string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: csrDER})),
		ValidityDuration: int64(max(ttl, 0) / time.Second),
	}
	resp, err := pb.NewIstioCertificateServiceClient(conn).CreateCertificate(ctx, req)
	if err != nil {
		return nil, fmt.Errorf("create certificate at %s: %w", c.addr, err)
	}
	issued, err := ParseCertChain(resp.GetCertChain())
	if err != nil {
		return nil, fmt.Errorf("response of ca %s: %w", c.addr, err)
	}
	return issued, nil
}

// readToken reads a bearer token file: surrounding whitespace is trimmed and
// the rest must be non-empty visible ASCII (it goes into a header). Errors
// name the file, never the token.
func readToken(path string) (string, error) {
	data, err := fileread.Read(path, fileread.MaxToken)
	if err != nil {
		return "", fmt.Errorf("token file: %w", err)
	}
	tok := strings.TrimSpace(string(data))
	if tok == "" {
		return "", fmt.Errorf("token file %s is empty", path)
	}
	for i := 0; i < len(tok); i++ {
		if tok[i] < 0x21 || tok[i] > 0x7e {
			return "", fmt.Errorf("token file %s: token contains whitespace or non-ASCII bytes", path)
		}
	}
	return tok, nil
}

// ParseCertChain interprets Istio's cert_chain: PEM strings, leaf first, the
// last one the root(s). Any element may hold several PEM blocks (a leaf with
// its intermediates, or several roots during a root rotation). A single
// element that ends in a self-signed CA yields that CA as root.
func ParseCertChain(elems []string) (*tlsmgr.Issued, error) {
	if len(elems) == 0 {
		return nil, errors.New("empty cert_chain")
	}
	groups := make([][]*x509.Certificate, len(elems))
	for i, e := range elems {
		certs, err := tlsmgr.ParseCertificatesPEM([]byte(e))
		if err != nil {
			return nil, fmt.Errorf("cert_chain[%d]: %w", i, err)
		}
		groups[i] = certs
	}
	var chain, roots []*x509.Certificate
	for _, g := range groups[:len(groups)-1] {
		chain = append(chain, g...)
	}
	if len(groups) == 1 {
		chain = groups[0]
		if last := chain[len(chain)-1]; len(chain) > 1 && selfSigned(last) {
			roots = []*x509.Certificate{last}
		}
	} else {
		roots = groups[len(groups)-1]
	}
	// The chain presented in handshakes needs no copy of a root.
	out := chain[:1:1]
	for _, c := range chain[1:] {
		if !contains(roots, c) {
			out = append(out, c)
		}
	}
	return &tlsmgr.Issued{Chain: out, Roots: roots}, nil
}

func selfSigned(c *x509.Certificate) bool {
	return c.IsCA && bytes.Equal(c.RawSubject, c.RawIssuer) && c.CheckSignatureFrom(c) == nil
}

func contains(set []*x509.Certificate, c *x509.Certificate) bool {
	for _, s := range set {
		if s.Equal(c) {
			return true
		}
	}
	return false
}
