package awspca

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/aws/arn"
	"github.com/aws/aws-sdk-go-v2/aws/ratelimit"
	"github.com/aws/aws-sdk-go-v2/aws/retry"
	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/service/acmpca"
	"github.com/aws/aws-sdk-go-v2/service/acmpca/schemas"
	"github.com/aws/aws-sdk-go-v2/service/acmpca/types"
	"github.com/aws/smithy-go"
	smithyhttp "github.com/aws/smithy-go/transport/http"
	"github.com/aws/smithy-go/transport/http/protocol/awsjson"

	"github.com/meshproxy/meshproxy/ca"
	"github.com/meshproxy/meshproxy/tlsmgr"
)

// DefaultTemplateARN is AWS's end-entity template whose API passthrough
// values (here: the SAN extension) go into the certificate; the CSR only
// supplies the public key.
const DefaultTemplateARN = "arn:aws:acm-pca:::template/EndEntityCertificate_APIPassthrough/V1"

// Limits on the exchange with AWS.
const (
	defaultTimeout  = 30 * time.Second
	maxAttempts     = 8                      // per API call; the deadline usually ends retries first
	maxRetryBackoff = 5 * time.Second        // between throttled attempts
	waiterMinDelay  = 500 * time.Millisecond // pending issuance is usually short
	waiterMaxDelay  = 5 * time.Second
)

// Option configures a Signer.
type Option func(*options)

type options struct {
	log        *slog.Logger
	region     string
	endpoint   string
	template   string
	timeout    time.Duration
	roots      []*x509.Certificate
	httpClient *http.Client
}

// WithLogger sets the signer's logger (default slog.Default()).
func WithLogger(l *slog.Logger) Option { return func(o *options) { o.log = l } }

// WithRegion sets the AWS region (default: the CA ARN's region).
func WithRegion(region string) Option { return func(o *options) { o.region = region } }

// WithEndpoint sends requests to url instead of the region's ACM PCA
// endpoint (a VPC interface endpoint, a FIPS endpoint, a proxy). Its TLS is
// verified with the system roots or AWS_CA_BUNDLE.
func WithEndpoint(url string) Option { return func(o *options) { o.endpoint = url } }

// WithTemplateARN sets the certificate template (default
// DefaultTemplateARN). The template must let the API passthrough SANs
// through, or every certificate is refused for lacking the SPIFFE ID.
func WithTemplateARN(arn string) Option { return func(o *options) { o.template = arn } }

// WithTimeout bounds a Sign call that has no earlier deadline, retries and
// waiting for issuance included (default 30s).
func WithTimeout(d time.Duration) Option { return func(o *options) { o.timeout = d } }

// WithRoots pins the trust anchors issued certificates must chain to and
// that workloads receive as trust bundle. Without it, New reads the CA's
// chain (GetCertificateAuthorityCertificate) once and trusts its
// self-signed certificates.
func WithRoots(roots ...*x509.Certificate) Option {
	return func(o *options) { o.roots = append(o.roots, roots...) }
}

// WithHTTPClient sets the HTTP client (default: the SDK's, which honours
// AWS_CA_BUNDLE and the proxy variables).
func WithHTTPClient(c *http.Client) Option { return func(o *options) { o.httpClient = c } }

// Signer has an AWS Private CA sign certificates. It implements ca.Signer
// and is safe for concurrent use.
type Signer struct {
	client   *acmpca.Client
	caARN    string
	template string
	algo     types.SigningAlgorithm
	timeout  time.Duration
	roots    []*x509.Certificate
	log      *slog.Logger
}

var _ ca.Signer = (*Signer)(nil)

// New returns a Signer for the private CA caARN
// (arn:aws:acm-pca:REGION:ACCOUNT:certificate-authority/ID), with
// credentials from the SDK's default chain. It reads the CA's certificate
// once, which chooses the signing algorithm (SHA256WITHECDSA,
// SHA384WITHECDSA or SHA256WITHRSA after the CA's key) and, without
// WithRoots, the roots; so bad credentials or a wrong ARN fail at start.
func New(ctx context.Context, caARN string, opts ...Option) (*Signer, error) {
	o := options{log: slog.Default(), template: DefaultTemplateARN, timeout: defaultTimeout}
	for _, opt := range opts {
		opt(&o)
	}
	parsed, err := arn.Parse(caARN)
	if err != nil || parsed.Service != "acm-pca" || !strings.HasPrefix(parsed.Resource, "certificate-authority/") {
		return nil, fmt.Errorf("private CA ARN %q: want arn:aws:acm-pca:REGION:ACCOUNT:certificate-authority/ID", caARN)
	}
	if _, err := arn.Parse(o.template); err != nil || !strings.Contains(o.template, ":template/") {
		return nil, fmt.Errorf("template ARN %q: want arn:aws:acm-pca:::template/NAME/VERSION", o.template)
	}
	region := o.region
	if region == "" {
		region = parsed.Region
	}
	if region == "" {
		return nil, fmt.Errorf("private CA ARN %q names no region; give one", caARN)
	}
	if o.endpoint != "" {
		u, err := url.Parse(o.endpoint)
		if err != nil || u.Scheme != "https" || u.Host == "" {
			return nil, fmt.Errorf("endpoint %q: want https://HOST[:PORT]", o.endpoint)
		}
	}
	loadOpts := []func(*config.LoadOptions) error{
		config.WithRegion(region),
		config.WithRetryer(func() aws.Retryer {
			return retry.NewStandard(func(so *retry.StandardOptions) {
				so.MaxAttempts = maxAttempts
				so.MaxBackoff = maxRetryBackoff
				// Throttled retries must not be cut short by the client-side
				// retry quota: the request's deadline bounds them.
				so.RateLimiter = ratelimit.None
			})
		}),
	}
	if o.httpClient != nil {
		loadOpts = append(loadOpts, config.WithHTTPClient(o.httpClient))
	}
	cfg, err := config.LoadDefaultConfig(ctx, loadOpts...)
	if err != nil {
		return nil, fmt.Errorf("aws configuration: %w", err)
	}
	client := acmpca.NewFromConfig(cfg, func(co *acmpca.Options) {
		// JSON 1.1, ACM PCA's long-standing protocol, rather than the SDK's
		// newer default (RPC v2 CBOR): what proxies, VPC endpoints and
		// audit tools in front of the service are known to pass and read.
		co.Protocol = awsjson.New11(schemas.ACMPrivateCA)
		if o.endpoint != "" {
			co.BaseEndpoint = aws.String(o.endpoint)
		}
	})
	s := &Signer{client: client, caARN: caARN, template: o.template, timeout: o.timeout, log: o.log}
	caCert, chain, err := s.caCertificates(ctx)
	if err != nil {
		return nil, err
	}
	if s.algo, err = signingAlgorithm(caCert); err != nil {
		return nil, fmt.Errorf("private CA %s: %w", caARN, err)
	}
	s.roots = slices.Clone(o.roots)
	if len(s.roots) == 0 {
		for _, c := range append([]*x509.Certificate{caCert}, chain...) {
			if bytes.Equal(c.RawSubject, c.RawIssuer) && c.CheckSignatureFrom(c) == nil {
				s.roots = append(s.roots, c)
			}
		}
		if len(s.roots) == 0 {
			return nil, fmt.Errorf("the chain of private CA %s holds no root (self-signed) certificate; give the root explicitly", caARN)
		}
	}
	return s, nil
}

// Name implements ca.Signer.
func (s *Signer) Name() string { return ca.SignerAWSPCA }

// Roots implements ca.Signer.
func (s *Signer) Roots() []*x509.Certificate { return slices.Clone(s.roots) }

// caCertificates reads the CA's own certificate and the chain above it.
func (s *Signer) caCertificates(ctx context.Context) (*x509.Certificate, []*x509.Certificate, error) {
	out, err := s.client.GetCertificateAuthorityCertificate(ctx, &acmpca.GetCertificateAuthorityCertificateInput{
		CertificateAuthorityArn: aws.String(s.caARN),
	})
	if err != nil {
		return nil, nil, fmt.Errorf("read the certificate of private CA %s: %w", s.caARN, describe(err))
	}
	certs, err := tlsmgr.ParseCertificatesPEM([]byte(aws.ToString(out.Certificate)))
	if err != nil || len(certs) != 1 {
		return nil, nil, fmt.Errorf("private CA %s: its certificate is not one PEM certificate (is the CA installed?)", s.caARN)
	}
	var chain []*x509.Certificate
	if pem := aws.ToString(out.CertificateChain); pem != "" {
		if chain, err = tlsmgr.ParseCertificatesPEM([]byte(pem)); err != nil {
			return nil, nil, fmt.Errorf("private CA %s: certificate chain: %w", s.caARN, err)
		}
	}
	return certs[0], chain, nil
}

// Sign implements ca.Signer: IssueCertificate with the CSR, the SPIFFE ID
// (and for the CA's own certificate its DNS names and IPs) as API
// passthrough SANs and the request's validity, then GetCertificate until
// issued. The idempotency token is the same for every retry of one request.
func (s *Signer) Sign(ctx context.Context, req *ca.SignRequest) ([]*x509.Certificate, error) {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, s.timeout)
		defer cancel()
	}
	sans := []types.GeneralName{{UniformResourceIdentifier: aws.String(req.ID.String())}}
	for _, n := range req.DNSNames {
		sans = append(sans, types.GeneralName{DnsName: aws.String(n)})
	}
	for _, ip := range req.IPAddresses {
		sans = append(sans, types.GeneralName{IpAddress: aws.String(ip.String())})
	}
	idem := make([]byte, 16)
	if _, err := rand.Read(idem); err != nil {
		return nil, fmt.Errorf("idempotency token: %w", err)
	}
	last := &lastError{}
	issued, err := s.client.IssueCertificate(ctx, &acmpca.IssueCertificateInput{
		CertificateAuthorityArn: aws.String(s.caARN),
		Csr:                     pemCSR(req.CSR),
		SigningAlgorithm:        s.algo,
		TemplateArn:             aws.String(s.template),
		Validity:                &types.Validity{Type: types.ValidityPeriodTypeAbsolute, Value: aws.Int64(req.NotAfter.Unix())},
		ValidityNotBefore:       &types.Validity{Type: types.ValidityPeriodTypeAbsolute, Value: aws.Int64(req.NotBefore.Unix())},
		ApiPassthrough:          &types.ApiPassthrough{Extensions: &types.Extensions{SubjectAlternativeNames: sans}},
		IdempotencyToken:        aws.String(hex.EncodeToString(idem)),
	}, last.record)
	if err != nil {
		return nil, fmt.Errorf("aws private CA %s: IssueCertificate: %w", s.caARN, last.describe(ctx, err))
	}
	certARN := aws.ToString(issued.CertificateArn)
	wait := time.Until(deadline(ctx))
	if wait <= 0 {
		return nil, fmt.Errorf("%w: aws private CA %s: no time left to fetch %s", ca.ErrBackendUnavailable, s.caARN, certARN)
	}
	got, err := acmpca.NewCertificateIssuedWaiter(s.client, func(wo *acmpca.CertificateIssuedWaiterOptions) {
		wo.MinDelay, wo.MaxDelay = waiterMinDelay, waiterMaxDelay
	}).WaitForOutput(ctx, &acmpca.GetCertificateInput{
		CertificateAuthorityArn: aws.String(s.caARN),
		CertificateArn:          aws.String(certARN),
	}, wait)
	if err != nil {
		var apiErr smithy.APIError
		if !errors.As(err, &apiErr) {
			// The waiter gave up: the deadline came while AWS still answered
			// RequestInProgressException.
			return nil, fmt.Errorf("%w: aws private CA %s: certificate %s still pending issuance: %w", ca.ErrBackendUnavailable, s.caARN, certARN, err)
		}
		return nil, fmt.Errorf("aws private CA %s: GetCertificate %s: %w", s.caARN, certARN, describe(err))
	}
	leaf, err := tlsmgr.ParseCertificatesPEM([]byte(aws.ToString(got.Certificate)))
	if err != nil {
		return nil, fmt.Errorf("%w: aws private CA %s: certificate %s: %w", ca.ErrBackendInvalid, s.caARN, certARN, err)
	}
	chain := leaf
	if pem := aws.ToString(got.CertificateChain); pem != "" {
		more, err := tlsmgr.ParseCertificatesPEM([]byte(pem))
		if err != nil {
			return nil, fmt.Errorf("%w: aws private CA %s: chain of %s: %w", ca.ErrBackendInvalid, s.caARN, certARN, err)
		}
		chain = append(chain, more...)
	}
	s.log.Debug("aws private CA signed", "spiffe_id", req.ID.String(), "certificate_arn", certARN)
	return chain, nil
}

func deadline(ctx context.Context) time.Time {
	d, _ := ctx.Deadline()
	return d
}

// lastError remembers the last error the retryer of one call saw, so that
// giving up at the deadline still says what AWS answered (the SDK then only
// reports the cancellation).
type lastError struct {
	mu  sync.Mutex
	err error
}

// record installs the recording retryer on one call's options.
func (l *lastError) record(o *acmpca.Options) {
	o.Retryer = &recordingRetryer{Retryer: o.Retryer, last: l}
}

// describe is describe(err), or after the context ended, describe of the
// last answer with the reason the signer gave up.
func (l *lastError) describe(ctx context.Context, err error) error {
	l.mu.Lock()
	prev := l.err
	l.mu.Unlock()
	if ctx.Err() == nil || prev == nil {
		return describe(err)
	}
	return fmt.Errorf("%w: gave up retrying (%v): last answer: %w", ca.ErrBackendUnavailable, ctx.Err(), describe(prev))
}

type recordingRetryer struct {
	aws.Retryer
	last *lastError
}

// IsErrorRetryable implements aws.Retryer. An attempt the context's end cut
// short answered nothing: the answer before it stays the last one.
func (r *recordingRetryer) IsErrorRetryable(err error) bool {
	r.last.mu.Lock()
	if r.last.err == nil || !errors.Is(err, context.Canceled) && !errors.Is(err, context.DeadlineExceeded) {
		r.last.err = err
	}
	r.last.mu.Unlock()
	return r.Retryer.IsErrorRetryable(err)
}

// unavailableCodes are AWS error codes meaning "try again later".
var unavailableCodes = []string{
	"ThrottlingException", "RequestInProgressException", "TooManyRequestsException",
	"RequestLimitExceeded", "ServiceUnavailable", "ServiceUnavailableException",
	"InternalFailure", "InternalServerError", "RequestTimeout", "RequestTimeoutException",
}

// describe classifies an SDK error: no answer, throttling, pending issuance
// or a 5xx is ErrBackendUnavailable; any other API error (access denied, a
// CA that is disabled, a malformed CSR, a template that does not exist) is
// ErrBackendRefused. Both carry AWS's error code and message.
func describe(err error) error {
	var apiErr smithy.APIError
	if errors.As(err, &apiErr) {
		msg := apiErr.ErrorMessage()
		if len(msg) > 512 {
			msg = msg[:512] + "…"
		}
		kind := ca.ErrBackendRefused
		var re *smithyhttp.ResponseError
		if slices.Contains(unavailableCodes, apiErr.ErrorCode()) || (errors.As(err, &re) && re.HTTPStatusCode() >= 500) {
			kind = ca.ErrBackendUnavailable
		}
		return fmt.Errorf("%w: %s: %s", kind, apiErr.ErrorCode(), msg)
	}
	var ne net.Error
	var re *smithyhttp.RequestSendError
	if errors.As(err, &ne) || errors.As(err, &re) || errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("%w: %w", ca.ErrBackendUnavailable, err)
	}
	// Credentials that cannot be found or refreshed, an unreadable answer.
	return fmt.Errorf("%w: %w", ca.ErrBackendRefused, err)
}

// signingAlgorithm is the algorithm a CA with caCert's key signs with.
func signingAlgorithm(caCert *x509.Certificate) (types.SigningAlgorithm, error) {
	switch k := caCert.PublicKey.(type) {
	case *ecdsa.PublicKey:
		switch k.Curve {
		case elliptic.P256():
			return types.SigningAlgorithmSha256withecdsa, nil
		case elliptic.P384():
			return types.SigningAlgorithmSha384withecdsa, nil
		case elliptic.P521():
			return types.SigningAlgorithmSha512withecdsa, nil
		}
	case *rsa.PublicKey:
		return types.SigningAlgorithmSha256withrsa, nil
	}
	return "", fmt.Errorf("CA key %T is not one meshproxy can ask AWS to sign with (ECDSA or RSA)", caCert.PublicKey)
}

func pemCSR(csr *x509.CertificateRequest) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: csr.Raw})
}
