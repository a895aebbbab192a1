package stepca

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"

	"github.com/meshproxy/meshproxy/ca"
	"github.com/meshproxy/meshproxy/tlsmgr"
)

// TemplateSPIFFE is the X.509 template for the JWK provisioner meshproxy
// uses (its "options": {"x509": {"template": ...}} in ca.json): the leaf's
// SANs are exactly the token's sans claim — the SPIFFE ID as URI SAN, plus
// DNS names and IPs for the CA's own serving certificate — with an empty
// subject (a SPIFFE ID is often longer than a CommonName may be), and the
// key usages of an X.509-SVID.
const TemplateSPIFFE = `{
	"subject": {},
	"sans": {{ toJson .SANs }},
{{- if typeIs "*rsa.PublicKey" .Insecure.CR.PublicKey }}
	"keyUsage": ["keyEncipherment", "digitalSignature"],
{{- else }}
	"keyUsage": ["digitalSignature"],
{{- end }}
	"extKeyUsage": ["serverAuth", "clientAuth"]
}`

// Limits on the exchange with step-ca.
const (
	tokenLifetime   = 5 * time.Minute
	maxResponseSize = 1 << 20
	defaultTimeout  = 30 * time.Second
)

// Option configures a Signer.
type Option func(*options)

type options struct {
	log     *slog.Logger
	timeout time.Duration
	now     func() time.Time
}

// WithLogger sets the signer's logger (default slog.Default()).
func WithLogger(l *slog.Logger) Option { return func(o *options) { o.log = l } }

// WithTimeout bounds each sign request (default 30s).
func WithTimeout(d time.Duration) Option { return func(o *options) { o.timeout = d } }

// WithClock replaces time.Now for the tokens' times, for tests.
func WithClock(now func() time.Time) Option { return func(o *options) { o.now = now } }

// Signer has step-ca sign certificates. It implements ca.Signer and is safe
// for concurrent use.
type Signer struct {
	signURL     string
	audience    string
	provisioner string
	roots       []*x509.Certificate
	jws         jose.Signer
	client      *http.Client
	log         *slog.Logger
	now         func() time.Time
}

var _ ca.Signer = (*Signer)(nil)

// New returns a Signer for the step-ca at caURL (https://HOST[:PORT]),
// whose TLS certificate and issued certificates chain to roots (step-ca's
// root_ca.crt), signing tokens as JWK provisioner provisioner with key (see
// LoadProvisionerKey).
func New(caURL string, roots []*x509.Certificate, provisioner string, key *jose.JSONWebKey, opts ...Option) (*Signer, error) {
	o := options{log: slog.Default(), timeout: defaultTimeout, now: time.Now}
	for _, opt := range opts {
		opt(&o)
	}
	u, err := url.Parse(caURL)
	if err != nil {
		return nil, fmt.Errorf("step-ca url %q: %w", caURL, err)
	}
	if u.Scheme != "https" || u.Host == "" || u.User != nil || u.RawQuery != "" || u.Fragment != "" {
		return nil, fmt.Errorf("step-ca url %q: want https://HOST[:PORT]", caURL)
	}
	if len(roots) == 0 {
		return nil, errors.New("step-ca: no root certificates")
	}
	if provisioner == "" {
		return nil, errors.New("step-ca: empty provisioner name")
	}
	if key == nil || key.IsPublic() || !key.Valid() {
		return nil, errors.New("step-ca: the provisioner's private JWK is needed")
	}
	alg, err := signatureAlgorithm(key.Key)
	if err != nil {
		return nil, fmt.Errorf("step-ca: %w", err)
	}
	if key.Algorithm != "" {
		alg = jose.SignatureAlgorithm(key.Algorithm)
	}
	jws, err := jose.NewSigner(jose.SigningKey{Algorithm: alg, Key: key}, (&jose.SignerOptions{}).WithType("JWT"))
	if err != nil {
		return nil, fmt.Errorf("step-ca: provisioner key: %w", err)
	}
	pool := x509.NewCertPool()
	for _, r := range roots {
		pool.AddCert(r)
	}
	base := strings.TrimSuffix(u.Path, "/")
	return &Signer{
		signURL:     (&url.URL{Scheme: "https", Host: u.Host, Path: base + "/1.0/sign"}).String(),
		audience:    (&url.URL{Scheme: "https", Host: u.Host, Path: "/1.0/sign"}).String(),
		provisioner: provisioner,
		roots:       slices.Clone(roots),
		jws:         jws,
		client: &http.Client{
			Transport: &http.Transport{
				TLSClientConfig:     &tls.Config{MinVersion: tls.VersionTLS12, RootCAs: pool},
				TLSHandshakeTimeout: 10 * time.Second,
				MaxIdleConnsPerHost: 4,
				IdleConnTimeout:     90 * time.Second,
				ForceAttemptHTTP2:   true,
			},
			Timeout: o.timeout,
			CheckRedirect: func(*http.Request, []*http.Request) error {
				return http.ErrUseLastResponse // a token is for one audience; never follow
			},
		},
		log: o.log,
		now: o.now,
	}, nil
}

// Name implements ca.Signer.
func (s *Signer) Name() string { return ca.SignerStepCA }

// Roots implements ca.Signer: the roots given to New.
func (s *Signer) Roots() []*x509.Certificate { return slices.Clone(s.roots) }

// Close releases idle connections to step-ca.
func (s *Signer) Close() { s.client.CloseIdleConnections() }

// signRequest is the body of POST /1.0/sign.
type signRequest struct {
	CSR      string `json:"csr"`
	OTT      string `json:"ott"`
	NotAfter string `json:"notAfter,omitempty"`
}

// signResponse is step-ca's answer: the leaf, its issuer and the chain, PEM.
type signResponse struct {
	Crt       string   `json:"crt"`
	CA        string   `json:"ca"`
	CertChain []string `json:"certChain"`
}

// apiError is step-ca's error body.
type apiError struct {
	Status  int    `json:"status"`
	Message string `json:"message"`
}

// Sign implements ca.Signer: it sends the CSR with a fresh one-time token
// for req.ID and the requested lifetime, and returns the chain step-ca
// answered with.
func (s *Signer) Sign(ctx context.Context, req *ca.SignRequest) ([]*x509.Certificate, error) {
	sans := []string{req.ID.String()}
	sans = append(sans, req.DNSNames...)
	for _, ip := range req.IPAddresses {
		sans = append(sans, ip.String())
	}
	ott, err := s.token(req.ID.String(), sans)
	if err != nil {
		return nil, err
	}
	body, err := json.Marshal(signRequest{
		CSR:      string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: req.CSR.Raw})),
		OTT:      ott,
		NotAfter: req.TTL.String(),
	})
	if err != nil {
		return nil, fmt.Errorf("step-ca sign request: %w", err)
	}
	hreq, err := http.NewRequestWithContext(ctx, http.MethodPost, s.signURL, bytes.NewReader(body))
	if err != nil {
		return nil, fmt.Errorf("step-ca sign request: %w", err)
	}
	hreq.Header.Set("Content-Type", "application/json")
	hreq.Header.Set("Accept", "application/json")
	resp, err := s.client.Do(hreq)
	if err != nil {
		if ctxErr := ctx.Err(); ctxErr != nil {
			return nil, fmt.Errorf("step-ca %s: %w", s.signURL, ctxErr)
		}
		return nil, fmt.Errorf("%w: step-ca %s: %w", ca.ErrBackendUnavailable, s.signURL, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, maxResponseSize+1))
	if err != nil {
		return nil, fmt.Errorf("%w: step-ca %s: read response: %w", ca.ErrBackendUnavailable, s.signURL, err)
	}
	if len(data) > maxResponseSize {
		return nil, fmt.Errorf("%w: step-ca %s: response exceeds %d bytes", ca.ErrBackendRefused, s.signURL, maxResponseSize)
	}
	if resp.StatusCode != http.StatusCreated && resp.StatusCode != http.StatusOK {
		return nil, statusError(s.signURL, resp.StatusCode, data)
	}
	var sr signResponse
	if err := json.Unmarshal(data, &sr); err != nil {
		return nil, fmt.Errorf("%w: step-ca %s: response is not a sign response: %w", ca.ErrBackendInvalid, s.signURL, err)
	}
	pems := sr.CertChain
	if len(pems) == 0 {
		pems = []string{sr.Crt, sr.CA}
	}
	var chain []*x509.Certificate
	for i, p := range pems {
		certs, err := tlsmgr.ParseCertificatesPEM([]byte(p))
		if err != nil {
			return nil, fmt.Errorf("%w: step-ca %s: certificate %d: %w", ca.ErrBackendInvalid, s.signURL, i+1, err)
		}
		chain = append(chain, certs...)
	}
	if len(chain) == 0 {
		return nil, fmt.Errorf("%w: step-ca %s: no certificate in the response", ca.ErrBackendInvalid, s.signURL)
	}
	s.log.Debug("step-ca signed", "spiffe_id", req.ID.String(), "serial", fmt.Sprintf("%x", chain[0].SerialNumber))
	return chain, nil
}

// statusError turns a non-success answer into an error: 429 and 5xx are
// temporary (ErrBackendUnavailable), the rest refusals.
func statusError(u string, code int, body []byte) error {
	msg := strings.TrimSpace(string(body))
	var ae apiError
	if json.Unmarshal(body, &ae) == nil && ae.Message != "" {
		msg = ae.Message
	}
	if len(msg) > 512 {
		msg = msg[:512] + "…"
	}
	kind := ca.ErrBackendRefused
	if code == http.StatusTooManyRequests || code >= 500 {
		kind = ca.ErrBackendUnavailable
	}
	return fmt.Errorf("%w: step-ca %s: %d %s: %s", kind, u, code, http.StatusText(code), msg)
}

// token is a one-time token for the sign API: iss the provisioner, sub the
// SPIFFE ID, sans the leaf's SANs, aud the sign URL, a random jti (step-ca
// refuses a token twice), valid for a few minutes.
func (s *Signer) token(subject string, sans []string) (string, error) {
	var jti [16]byte
	if _, err := rand.Read(jti[:]); err != nil {
		return "", fmt.Errorf("step-ca token id: %w", err)
	}
	now := s.now()
	claims := jwt.Claims{
		Issuer:    s.provisioner,
		Subject:   subject,
		Audience:  jwt.Audience{s.audience},
		NotBefore: jwt.NewNumericDate(now),
		IssuedAt:  jwt.NewNumericDate(now),
		Expiry:    jwt.NewNumericDate(now.Add(tokenLifetime)),
		ID:        hex.EncodeToString(jti[:]),
	}
	tok, err := jwt.Signed(s.jws).Claims(claims).Claims(map[string]any{"sans": sans}).Serialize()
	if err != nil {
		return "", fmt.Errorf("step-ca token: %w", err)
	}
	return tok, nil
}
