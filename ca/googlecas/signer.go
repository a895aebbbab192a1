package googlecas

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"regexp"
	"slices"
	"time"

	privateca "cloud.google.com/go/security/privateca/apiv1"
	"cloud.google.com/go/security/privateca/apiv1/privatecapb"
	"github.com/googleapis/gax-go/v2"
	"google.golang.org/api/option"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/meshproxy/meshproxy/ca"
	"github.com/meshproxy/meshproxy/tlsmgr"
)

// Limits on the exchange with CAS.
const (
	defaultTimeout  = 30 * time.Second
	maxRetryBackoff = 5 * time.Second
)

// Resource names CAS accepts.
var (
	poolName     = regexp.MustCompile(`^projects/[^/]+/locations/[^/]+/caPools/[^/]+$`)
	templateName = regexp.MustCompile(`^projects/[^/]+/locations/[^/]+/certificateTemplates/[^/]+$`)
	caID         = regexp.MustCompile(`^[a-zA-Z0-9_-]{1,63}$`)
)

// Option configures a Signer.
type Option func(*options)

type options struct {
	log        *slog.Logger
	ca         string
	template   string
	endpoint   string
	timeout    time.Duration
	roots      []*x509.Certificate
	clientOpts []option.ClientOption
}

// WithLogger sets the signer's logger (default slog.Default()).
func WithLogger(l *slog.Logger) Option { return func(o *options) { o.log = l } }

// WithCertificateAuthority has one CA of the pool issue (its ID, not its
// full name); by default CAS picks an enabled CA of the pool.
func WithCertificateAuthority(id string) Option { return func(o *options) { o.ca = id } }

// WithTemplate applies a certificate template
// (projects/P/locations/L/certificateTemplates/T) to every certificate.
func WithTemplate(name string) Option { return func(o *options) { o.template = name } }

// WithEndpoint sends requests to HOST:PORT instead of CAS's public endpoint
// (a Private Service Connect endpoint, say).
func WithEndpoint(hostPort string) Option { return func(o *options) { o.endpoint = hostPort } }

// WithTimeout bounds a Sign call that has no earlier deadline, retries
// included (default 30s).
func WithTimeout(d time.Duration) Option { return func(o *options) { o.timeout = d } }

// WithRoots pins the trust anchors issued certificates must chain to and
// that workloads receive as trust bundle. Without it, New reads the pool's
// CA certificates (FetchCaCerts) once and trusts their roots.
func WithRoots(roots ...*x509.Certificate) Option {
	return func(o *options) { o.roots = append(o.roots, roots...) }
}

// WithClientOptions passes options to the CAS client (credentials, gRPC
// dial options), after meshproxy's own.
func WithClientOptions(opts ...option.ClientOption) Option {
	return func(o *options) { o.clientOpts = append(o.clientOpts, opts...) }
}

// Signer has a Google CAS CA pool sign certificates. It implements
// ca.Signer and is safe for concurrent use.
type Signer struct {
	client   *privateca.CertificateAuthorityClient
	pool     string
	ca       string
	template string
	timeout  time.Duration
	roots    []*x509.Certificate
	log      *slog.Logger
}

var _ ca.Signer = (*Signer)(nil)

// New returns a Signer for the CA pool pool
// (projects/P/locations/L/caPools/POOL) with Application Default
// Credentials. Without WithRoots it reads the pool's CA certificates, so
// bad credentials or a wrong pool fail at start.
func New(ctx context.Context, pool string, opts ...Option) (*Signer, error) {
	o := options{log: slog.Default(), timeout: defaultTimeout}
	for _, opt := range opts {
		opt(&o)
	}
	if err := CheckPoolName(pool); err != nil {
		return nil, err
	}
	if o.template != "" && !templateName.MatchString(o.template) {
		return nil, fmt.Errorf("certificate template %q: want projects/PROJECT/locations/LOCATION/certificateTemplates/TEMPLATE", o.template)
	}
	if o.ca != "" && !caID.MatchString(o.ca) {
		return nil, fmt.Errorf("certificate authority %q: want the CA's ID within the pool", o.ca)
	}
	var clientOpts []option.ClientOption
	if o.endpoint != "" {
		clientOpts = append(clientOpts, option.WithEndpoint(o.endpoint))
	}
	client, err := privateca.NewCertificateAuthorityClient(ctx, append(clientOpts, o.clientOpts...)...)
	if err != nil {
		return nil, fmt.Errorf("google CAS client: %w", err)
	}
	s := &Signer{client: client, pool: pool, ca: o.ca, template: o.template, timeout: o.timeout, log: o.log}
	s.roots = slices.Clone(o.roots)
	if len(s.roots) == 0 {
		if s.roots, err = s.readRoots(ctx); err != nil {
			client.Close()
			return nil, err
		}
	}
	return s, nil
}

// CheckPoolName reports whether name is a CA pool's full resource name.
func CheckPoolName(name string) error {
	if !poolName.MatchString(name) {
		return fmt.Errorf("CA pool %q: want projects/PROJECT/locations/LOCATION/caPools/POOL", name)
	}
	return nil
}

// Name implements ca.Signer.
func (s *Signer) Name() string { return ca.SignerGoogleCAS }

// Roots implements ca.Signer.
func (s *Signer) Roots() []*x509.Certificate { return slices.Clone(s.roots) }

// Close closes the connection to CAS.
func (s *Signer) Close() { _ = s.client.Close() }

// readRoots fetches the pool's CA chains and keeps their self-signed
// certificates.
func (s *Signer) readRoots(ctx context.Context) ([]*x509.Certificate, error) {
	resp, err := s.client.FetchCaCerts(ctx, &privatecapb.FetchCaCertsRequest{CaPool: s.pool, RequestId: requestID()})
	if err != nil {
		return nil, fmt.Errorf("read the roots of google CAS pool %s: %w", s.pool, describe(err))
	}
	var roots []*x509.Certificate
	for _, chain := range resp.GetCaCerts() {
		for _, p := range chain.GetCertificates() {
			certs, err := tlsmgr.ParseCertificatesPEM([]byte(p))
			if err != nil {
				return nil, fmt.Errorf("google CAS pool %s: CA certificates: %w", s.pool, err)
			}
			for _, c := range certs {
				if bytes.Equal(c.RawSubject, c.RawIssuer) && c.CheckSignatureFrom(c) == nil && !slices.ContainsFunc(roots, c.Equal) {
					roots = append(roots, c)
				}
			}
		}
	}
	if len(roots) == 0 {
		return nil, fmt.Errorf("the CA certificates of google CAS pool %s hold no root (self-signed) certificate; give the root explicitly", s.pool)
	}
	return roots, nil
}

// Sign implements ca.Signer: CreateCertificate with the CSR's public key,
// the SPIFFE ID (and for the CA's own certificate its DNS names and IPs) as
// SANs, end-entity key usages and the request's lifetime. Unavailable and
// ResourceExhausted (quota) answers are retried with backoff until the
// deadline, with the same request ID.
func (s *Signer) Sign(ctx context.Context, req *ca.SignRequest) ([]*x509.Certificate, error) {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, s.timeout)
		defer cancel()
	}
	spki, err := x509.MarshalPKIXPublicKey(req.CSR.PublicKey)
	if err != nil {
		return nil, fmt.Errorf("%w: csr public key: %w", ca.ErrBadCSR, err)
	}
	sans := &privatecapb.SubjectAltNames{Uris: []string{req.ID.String()}, DnsNames: slices.Clone(req.DNSNames)}
	for _, ip := range req.IPAddresses {
		sans.IpAddresses = append(sans.IpAddresses, ip.String())
	}
	_, isRSA := req.CSR.PublicKey.(*rsa.PublicKey)
	isCA := false
	cert := &privatecapb.Certificate{
		Lifetime:            durationpb.New(time.Until(req.NotAfter)),
		CertificateTemplate: s.template,
		CertificateConfig: &privatecapb.Certificate_Config{Config: &privatecapb.CertificateConfig{
			PublicKey: &privatecapb.PublicKey{
				Key:    pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: spki}),
				Format: privatecapb.PublicKey_PEM,
			},
			SubjectConfig: &privatecapb.CertificateConfig_SubjectConfig{
				Subject:        &privatecapb.Subject{},
				SubjectAltName: sans,
			},
			X509Config: &privatecapb.X509Parameters{
				KeyUsage: &privatecapb.KeyUsage{
					BaseKeyUsage:     &privatecapb.KeyUsage_KeyUsageOptions{DigitalSignature: true, KeyEncipherment: isRSA},
					ExtendedKeyUsage: &privatecapb.KeyUsage_ExtendedKeyUsageOptions{ServerAuth: true, ClientAuth: true},
				},
				CaOptions: &privatecapb.X509Parameters_CaOptions{IsCa: &isCA},
			},
		}},
	}
	id := requestID()
	got, err := s.client.CreateCertificate(ctx, &privatecapb.CreateCertificateRequest{
		Parent:                        s.pool,
		CertificateId:                 "meshproxy-" + id[:20],
		Certificate:                   cert,
		RequestId:                     id,
		IssuingCertificateAuthorityId: s.ca,
	}, gax.WithRetry(func() gax.Retryer {
		return gax.OnCodes([]codes.Code{codes.Unavailable, codes.ResourceExhausted, codes.DeadlineExceeded},
			gax.Backoff{Initial: 200 * time.Millisecond, Max: maxRetryBackoff, Multiplier: 2})
	}))
	if err != nil {
		return nil, fmt.Errorf("google CAS pool %s: CreateCertificate: %w", s.pool, describe(err))
	}
	chain, err := tlsmgr.ParseCertificatesPEM([]byte(got.GetPemCertificate()))
	if err != nil {
		return nil, fmt.Errorf("%w: google CAS pool %s: certificate %s: %w", ca.ErrBackendInvalid, s.pool, got.GetName(), err)
	}
	for _, p := range got.GetPemCertificateChain() {
		more, err := tlsmgr.ParseCertificatesPEM([]byte(p))
		if err != nil {
			return nil, fmt.Errorf("%w: google CAS pool %s: chain of %s: %w", ca.ErrBackendInvalid, s.pool, got.GetName(), err)
		}
		chain = append(chain, more...)
	}
	s.log.Debug("google CAS signed", "spiffe_id", req.ID.String(), "certificate", got.GetName())
	return chain, nil
}

// requestID is a random UUID (v4): CAS ignores a repeated request with the
// same ID, so a retried request issues one certificate.
func requestID() string {
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	h := hex.EncodeToString(b)
	return h[:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
}

// describe classifies a CAS error: Unavailable, ResourceExhausted (quota),
// DeadlineExceeded and a cancelled or timed-out call are
// ErrBackendUnavailable; other codes (PermissionDenied, NotFound,
// FailedPrecondition for a disabled CA, InvalidArgument for a template
// that refuses the request) are ErrBackendRefused. Both carry CAS's message.
func describe(err error) error {
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
		return fmt.Errorf("%w: %w", ca.ErrBackendUnavailable, err)
	}
	st, ok := status.FromError(err)
	if !ok {
		return fmt.Errorf("%w: %w", ca.ErrBackendRefused, err)
	}
	msg := st.Message()
	if len(msg) > 512 {
		msg = msg[:512] + "…"
	}
	kind := ca.ErrBackendRefused
	switch st.Code() {
	case codes.Unavailable, codes.ResourceExhausted, codes.DeadlineExceeded, codes.Canceled, codes.Aborted:
		kind = ca.ErrBackendUnavailable
	}
	return fmt.Errorf("%w: %s: %s", kind, st.Code(), msg)
}
