package vault

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/meshproxy/meshproxy/ca"
	"github.com/meshproxy/meshproxy/internal/fileread"
	"github.com/meshproxy/meshproxy/tlsmgr"
)

// DefaultMount is the path the PKI secrets engine is usually enabled at.
const DefaultMount = "pki"

// Limits on the exchange with Vault.
const (
	defaultTimeout = 30 * time.Second
	maxTokenFile   = fileread.MaxToken
	maxResponse    = 1 << 20 // a signed chain is a few KB
	maxCAFile      = 1 << 20 // VAULT_CACERT, a file of VAULT_CAPATH
	maxMessage     = 512     // of Vault's error messages, in errors
)

// Option configures a Signer.
type Option func(*options)

type options struct {
	log     *slog.Logger
	timeout time.Duration
	caPEM   []byte
	roots   []*x509.Certificate
	mount   string
}

// WithLogger sets the signer's logger (default slog.Default()).
func WithLogger(l *slog.Logger) Option { return func(o *options) { o.log = l } }

// WithTimeout bounds each request to Vault (default 30s).
func WithTimeout(d time.Duration) Option { return func(o *options) { o.timeout = d } }

// WithMount sets the path of the PKI secrets engine (default "pki").
func WithMount(mount string) Option { return func(o *options) { o.mount = mount } }

// WithRoots pins the trust anchors issued certificates must chain to and
// that workloads receive as trust bundle. Without it, New reads the mount's
// CA chain (GET /v1/<mount>/cert/ca_chain) once and trusts the self-signed
// certificates in it.
func WithRoots(roots ...*x509.Certificate) Option {
	return func(o *options) { o.roots = append(o.roots, roots...) }
}

// WithCACert trusts the PEM certificates in pem for Vault's own TLS
// certificate, besides what VAULT_CACERT / VAULT_CAPATH name.
func WithCACert(pem []byte) Option { return func(o *options) { o.caPEM = pem } }

// Signer has a Vault PKI role sign certificates. It implements ca.Signer and
// is safe for concurrent use.
type Signer struct {
	client    *http.Client
	namespace string // VAULT_NAMESPACE (Vault Enterprise), sent as X-Vault-Namespace
	addr      string
	mount     string
	role      string
	tokenFile string
	roots     []*x509.Certificate
	log       *slog.Logger
}

var _ ca.Signer = (*Signer)(nil)

// New returns a Signer for the PKI role role of the Vault at addr
// (https://HOST:8200), authenticating with the token in tokenFile, which is
// re-read for every request (so a Vault Agent may rotate it). Vault's TLS is
// configured from the usual VAULT_CACERT, VAULT_CAPATH, VAULT_CLIENT_CERT,
// VAULT_CLIENT_KEY and VAULT_TLS_SERVER_NAME variables (and WithCACert),
// as Vault's own client reads them, with VAULT_SKIP_VERIFY (logged as a
// warning) and VAULT_NAMESPACE; VAULT_TOKEN is ignored. New checks the token
// file and, without WithRoots, reads the roots from Vault, so a
// misconfiguration fails at start.
//
// The exchange is two calls of Vault's HTTP API, made with net/http (not
// Vault's Go client, whose package initialisation would cost every process
// of the one binary — every sidecar — a few hundred KB).
func New(ctx context.Context, addr, tokenFile, role string, opts ...Option) (*Signer, error) {
	o := options{log: slog.Default(), timeout: defaultTimeout, mount: DefaultMount}
	for _, opt := range opts {
		opt(&o)
	}
	u, err := url.Parse(addr)
	if err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" {
		return nil, fmt.Errorf("vault address %q: want https://HOST[:PORT]", addr)
	}
	mount := strings.Trim(o.mount, "/")
	if mount == "" || strings.Contains(mount, "..") {
		return nil, fmt.Errorf("vault mount %q: want a path such as %q", o.mount, DefaultMount)
	}
	if role == "" || strings.ContainsAny(role, "/?#") {
		return nil, fmt.Errorf("vault role %q: want a role name", role)
	}
	if _, err := readToken(tokenFile); err != nil {
		return nil, err
	}
	tlsConf, err := tlsConfigFromEnv(o.caPEM, o.log)
	if err != nil {
		return nil, fmt.Errorf("vault TLS: %w", err)
	}
	transport := http.DefaultTransport.(*http.Transport).Clone()
	transport.TLSClientConfig = tlsConf
	// The sidecar retries with backoff; a request must not hang here.
	client := &http.Client{Transport: transport, Timeout: o.timeout}
	if u.Scheme == "http" {
		o.log.Warn("vault address is plain http: the token and certificates travel unencrypted", "addr", addr)
	}
	s := &Signer{client: client, namespace: os.Getenv("VAULT_NAMESPACE"), addr: strings.TrimSuffix(addr, "/"),
		mount: mount, role: role, tokenFile: tokenFile, log: o.log}
	s.roots = slices.Clone(o.roots)
	if len(s.roots) == 0 {
		if s.roots, err = s.readRoots(ctx); err != nil {
			return nil, err
		}
	}
	return s, nil
}

// tlsConfigFromEnv builds the TLS client configuration for Vault from the
// VAULT_* variables: trusted CAs from VAULT_CACERT (a PEM file),
// VAULT_CAPATH (a directory of PEM files) and caPEM, the system's when none
// is given; a client certificate from VAULT_CLIENT_CERT and
// VAULT_CLIENT_KEY; VAULT_TLS_SERVER_NAME; VAULT_SKIP_VERIFY.
func tlsConfigFromEnv(caPEM []byte, log *slog.Logger) (*tls.Config, error) {
	conf := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: os.Getenv("VAULT_TLS_SERVER_NAME")}
	var pems [][]byte
	if f := os.Getenv("VAULT_CACERT"); f != "" {
		b, err := fileread.Read(f, maxCAFile)
		if err != nil {
			return nil, fmt.Errorf("VAULT_CACERT: %w", err)
		}
		pems = append(pems, b)
	}
	if dir := os.Getenv("VAULT_CAPATH"); dir != "" {
		entries, err := os.ReadDir(dir)
		if err != nil {
			return nil, fmt.Errorf("VAULT_CAPATH: %w", err)
		}
		for _, e := range entries {
			if e.IsDir() {
				continue
			}
			b, err := fileread.Read(filepath.Join(dir, e.Name()), maxCAFile)
			if err != nil {
				return nil, fmt.Errorf("VAULT_CAPATH: %w", err)
			}
			pems = append(pems, b)
		}
	}
	if len(caPEM) > 0 {
		pems = append(pems, caPEM)
	}
	if len(pems) > 0 {
		conf.RootCAs = x509.NewCertPool()
		for _, b := range pems {
			if !conf.RootCAs.AppendCertsFromPEM(b) {
				return nil, errors.New("a CA certificate file (VAULT_CACERT, VAULT_CAPATH) holds no PEM certificate")
			}
		}
	}
	certFile, keyFile := os.Getenv("VAULT_CLIENT_CERT"), os.Getenv("VAULT_CLIENT_KEY")
	switch {
	case certFile != "" && keyFile != "":
		cert, err := tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			return nil, fmt.Errorf("VAULT_CLIENT_CERT / VAULT_CLIENT_KEY: %w", err)
		}
		conf.Certificates = []tls.Certificate{cert}
	case certFile != "" || keyFile != "":
		return nil, errors.New("VAULT_CLIENT_CERT and VAULT_CLIENT_KEY go together")
	}
	if v := os.Getenv("VAULT_SKIP_VERIFY"); v != "" {
		skip, err := strconv.ParseBool(v)
		if err != nil {
			return nil, fmt.Errorf("VAULT_SKIP_VERIFY %q: want true or false", v)
		}
		if skip {
			log.Warn("VAULT_SKIP_VERIFY is set: Vault's TLS certificate is not verified")
			conf.InsecureSkipVerify = true
		}
	}
	return conf, nil
}

// Name implements ca.Signer.
func (s *Signer) Name() string { return ca.SignerVault }

// Roots implements ca.Signer.
func (s *Signer) Roots() []*x509.Certificate { return slices.Clone(s.roots) }

// Close releases idle connections to Vault.
func (s *Signer) Close() { s.client.CloseIdleConnections() }

// readRoots reads the mount's CA chain and keeps its self-signed
// certificates.
func (s *Signer) readRoots(ctx context.Context) ([]*x509.Certificate, error) {
	path := s.mount + "/cert/ca_chain"
	secret, err := s.do(ctx, http.MethodGet, path, "", nil)
	if err != nil {
		return nil, fmt.Errorf("read the roots from vault %s: %w", s.url(path), describe(err))
	}
	if secret == nil {
		return nil, fmt.Errorf("read the roots from vault %s: no such path (is the PKI engine mounted at %q?)", s.url(path), s.mount)
	}
	chain, err := pemField(secret.Data, "certificate")
	if err != nil {
		return nil, fmt.Errorf("read the roots from vault %s: %w", s.url(path), err)
	}
	var roots []*x509.Certificate
	for _, c := range chain {
		if bytes.Equal(c.RawSubject, c.RawIssuer) && c.CheckSignatureFrom(c) == nil {
			roots = append(roots, c)
		}
	}
	if len(roots) == 0 {
		return nil, fmt.Errorf("the CA chain of vault %s holds no root (self-signed) certificate; give the root explicitly", s.url(path))
	}
	return roots, nil
}

// Sign implements ca.Signer: it writes the CSR, the SPIFFE ID as uri_sans
// and the TTL to <mount>/sign/<role> and returns the certificate followed by
// the CA chain Vault answered with.
func (s *Signer) Sign(ctx context.Context, req *ca.SignRequest) ([]*x509.Certificate, error) {
	tok, err := readToken(s.tokenFile)
	if err != nil {
		return nil, err
	}
	data := map[string]any{
		"csr":                  string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: req.CSR.Raw})),
		"uri_sans":             req.ID.String(),
		"ttl":                  strconv.FormatInt(int64(req.TTL/time.Second), 10) + "s",
		"format":               "pem",
		"exclude_cn_from_sans": true,
	}
	if len(req.DNSNames) > 0 {
		data["alt_names"] = strings.Join(req.DNSNames, ",")
	}
	if len(req.IPAddresses) > 0 {
		ips := make([]string, len(req.IPAddresses))
		for i, ip := range req.IPAddresses {
			ips[i] = ip.String()
		}
		data["ip_sans"] = strings.Join(ips, ",")
	}
	path := s.mount + "/sign/" + s.role
	secret, err := s.do(ctx, http.MethodPost, path, tok, data)
	if err != nil {
		if ctxErr := ctx.Err(); ctxErr != nil {
			return nil, fmt.Errorf("vault %s: %w", s.url(path), ctxErr)
		}
		return nil, fmt.Errorf("vault %s: %w", s.url(path), describe(err))
	}
	if secret == nil || secret.Data == nil {
		return nil, fmt.Errorf("%w: vault %s: no such path (is the PKI engine mounted at %q with role %q?)", ca.ErrBackendRefused, s.url(path), s.mount, s.role)
	}
	leaf, err := pemField(secret.Data, "certificate")
	if err != nil {
		return nil, fmt.Errorf("%w: vault %s: %w", ca.ErrBackendInvalid, s.url(path), err)
	}
	chain := leaf
	switch {
	case secret.Data["ca_chain"] != nil:
		more, err := pemField(secret.Data, "ca_chain")
		if err != nil {
			return nil, fmt.Errorf("%w: vault %s: %w", ca.ErrBackendInvalid, s.url(path), err)
		}
		chain = append(chain, more...)
	case secret.Data["issuing_ca"] != nil:
		more, err := pemField(secret.Data, "issuing_ca")
		if err != nil {
			return nil, fmt.Errorf("%w: vault %s: %w", ca.ErrBackendInvalid, s.url(path), err)
		}
		chain = append(chain, more...)
	}
	s.log.Debug("vault signed", "spiffe_id", req.ID.String(), "serial", secret.Data["serial_number"])
	return chain, nil
}

func (s *Signer) url(path string) string {
	return s.addr + "/v1/" + path
}

// answer is the part of Vault's answer the signer reads.
type answer struct {
	Data     map[string]any `json:"data"`
	Warnings []string       `json:"warnings"`
}

// responseError is an answer with an error status: Vault's "errors", or the
// body itself when it is not Vault's JSON.
type responseError struct {
	status int
	errors []string
}

func (e *responseError) Error() string {
	return fmt.Sprintf("%d %s: %s", e.status, http.StatusText(e.status), strings.Join(e.errors, "; "))
}

// do makes one call of Vault's HTTP API, /v1/path, with token (if any) in
// X-Vault-Token and body (if any) as JSON. A 404 without data is no secret
// (nil, nil), as Vault's own client reads it; another status outside 2xx is
// a *responseError.
func (s *Signer) do(ctx context.Context, method, path, token string, body map[string]any) (*answer, error) {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return nil, err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, s.url(path), rd)
	if err != nil {
		return nil, err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if token != "" {
		req.Header.Set("X-Vault-Token", token)
	}
	if s.namespace != "" {
		req.Header.Set("X-Vault-Namespace", s.namespace)
	}
	resp, err := s.client.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(io.LimitReader(resp.Body, maxResponse+1))
	if err != nil {
		return nil, fmt.Errorf("read the answer: %w", err)
	}
	if len(raw) > maxResponse {
		return nil, fmt.Errorf("answer larger than %d bytes", maxResponse)
	}
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		if resp.StatusCode == http.StatusNotFound {
			var sec answer
			if json.Unmarshal(raw, &sec) == nil && (len(sec.Data) > 0 || len(sec.Warnings) > 0) {
				return &sec, nil
			}
			return nil, nil
		}
		var e struct {
			Errors []string `json:"errors"`
		}
		if json.Unmarshal(raw, &e) != nil {
			if text := strings.TrimSpace(string(raw)); text != "" {
				e.Errors = []string{text}
			}
		}
		return nil, &responseError{status: resp.StatusCode, errors: e.Errors}
	}
	if len(bytes.TrimSpace(raw)) == 0 { // 204 No Content
		return nil, nil
	}
	var sec answer
	if err := json.Unmarshal(raw, &sec); err != nil {
		return nil, fmt.Errorf("answer is not Vault's JSON: %w", err)
	}
	return &sec, nil
}

// pemField parses a response field holding PEM certificates: one string
// (possibly several blocks) or a list of strings.
func pemField(data map[string]any, field string) ([]*x509.Certificate, error) {
	var pems []string
	switch v := data[field].(type) {
	case string:
		pems = []string{v}
	case []any:
		for _, e := range v {
			s, ok := e.(string)
			if !ok {
				return nil, fmt.Errorf("field %q: element of type %T, want a PEM string", field, e)
			}
			pems = append(pems, s)
		}
	case nil:
		return nil, fmt.Errorf("field %q missing", field)
	default:
		return nil, fmt.Errorf("field %q: type %T, want a PEM string", field, v)
	}
	var certs []*x509.Certificate
	for _, p := range pems {
		c, err := tlsmgr.ParseCertificatesPEM([]byte(p))
		if err != nil {
			return nil, fmt.Errorf("field %q: %w", field, err)
		}
		certs = append(certs, c...)
	}
	return certs, nil
}

// describe classifies an error of the Vault client: no answer, 429 or 5xx
// (sealed, standby, overloaded) is ErrBackendUnavailable; another error
// status is ErrBackendRefused, with Vault's own messages.
func describe(err error) error {
	var re *responseError
	if errors.As(err, &re) {
		msg := strings.Join(re.errors, "; ")
		if msg == "" {
			msg = "no error message"
		}
		if len(msg) > maxMessage {
			msg = msg[:maxMessage] + "…"
		}
		kind := ca.ErrBackendRefused
		if re.status == http.StatusTooManyRequests || re.status >= 500 {
			kind = ca.ErrBackendUnavailable
		}
		return fmt.Errorf("%w: %d %s: %s", kind, re.status, http.StatusText(re.status), msg)
	}
	// No answer (refused, reset, timed out) or an unreadable one.
	return fmt.Errorf("%w: %w", ca.ErrBackendUnavailable, err)
}

// readToken reads the Vault token from path; it is never logged.
func readToken(path string) (string, error) {
	data, err := fileread.Read(path, maxTokenFile)
	if err != nil {
		return "", fmt.Errorf("vault token file: %w", err)
	}
	tok := strings.TrimSpace(string(data))
	if tok == "" {
		return "", fmt.Errorf("vault token file %s is empty", path)
	}
	if strings.ContainsAny(tok, " \t\r\n") {
		return "", fmt.Errorf("vault token file %s: the token contains white space", path)
	}
	return tok, nil
}
