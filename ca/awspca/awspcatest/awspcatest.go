package awspcatest

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	v4 "github.com/aws/aws-sdk-go-v2/aws/signer/v4"

	"github.com/meshproxy/meshproxy/internal/testpki"
)

// Account, region and credentials the fake expects.
const (
	Region    = "eu-west-1"
	AccessKey = "AKIAMESHPROXYTEST"
	SecretKey = "meshproxy-test-secret-key"
	service   = "acm-pca"
)

// Server is a fake AWS Private CA with one CA, over TLS.
type Server struct {
	URL     string // https://127.0.0.1:PORT
	CAARN   string
	PKI     *testpki.CA
	srv     *httptest.Server
	mu      sync.Mutex
	state   state
	calls   []Call
	pending map[string]*pendingCert
	seq     int
}

type state struct {
	throttle   int  // IssueCertificate calls still to throttle
	inProgress int  // GetCertificate answers per certificate before it is issued
	stripURI   bool // the template drops the URI SAN
	fail       *APIError
	noRoot     bool // the CA's chain stops below the root
}

type pendingCert struct {
	der   []byte
	polls int
}

// Call is a request the fake accepted as correctly signed.
type Call struct {
	Operation string         // IssueCertificate, GetCertificate, ...
	Input     map[string]any // the JSON body
	Region    string         // from the SigV4 credential scope
}

// APIError is an error answer: the JSON 1.1 protocol's __type and message.
type APIError struct {
	Status  int
	Code    string
	Message string
}

// Start runs a fake private CA signing with pki's intermediate. It sets the
// process environment for the SDK's default credential chain (access key,
// AWS_CA_BUNDLE trusting the fake's TLS, no shared files, no IMDS) for the
// test's duration.
func Start(t *testing.T, pki *testpki.CA) *Server {
	t.Helper()
	s := &Server{
		PKI:     pki,
		CAARN:   "arn:aws:acm-pca:" + Region + ":111122223333:certificate-authority/11111111-2222-3333-4444-555555555555",
		pending: map[string]*pendingCert{},
	}
	s.srv = httptest.NewUnstartedServer(http.HandlerFunc(s.serve))
	s.srv.StartTLS()
	t.Cleanup(s.srv.Close)
	s.URL = s.srv.URL
	dir := t.TempDir()
	bundle := filepath.Join(dir, "ca-bundle.pem")
	if err := os.WriteFile(bundle, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: s.srv.Certificate().Raw}), 0o600); err != nil {
		t.Fatal(err)
	}
	for k, v := range map[string]string{
		"AWS_ACCESS_KEY_ID":           AccessKey,
		"AWS_SECRET_ACCESS_KEY":       SecretKey,
		"AWS_SESSION_TOKEN":           "",
		"AWS_PROFILE":                 "",
		"AWS_REGION":                  "",
		"AWS_CA_BUNDLE":               bundle,
		"AWS_CONFIG_FILE":             filepath.Join(dir, "none"),
		"AWS_SHARED_CREDENTIALS_FILE": filepath.Join(dir, "none"),
		"AWS_EC2_METADATA_DISABLED":   "true",
	} {
		t.Setenv(k, v)
	}
	return s
}

// Close stops the server: requests then fail to connect.
func (s *Server) Close() { s.srv.Close() }

// Throttle answers the next n IssueCertificate calls with
// ThrottlingException ("Rate exceeded").
func (s *Server) Throttle(n int) { s.with(func(st *state) { st.throttle = n }) }

// InProgress answers GetCertificate for a new certificate n times with
// RequestInProgressException before returning it.
func (s *Server) InProgress(n int) { s.with(func(st *state) { st.inProgress = n }) }

// StripURISAN makes issued certificates lack the URI SAN, as a template
// that does not pass API passthrough SANs through does.
func (s *Server) StripURISAN(on bool) { s.with(func(st *state) { st.stripURI = on }) }

// ChainIncludesRoot sets whether the CA's chain ends with the root
// (default yes, as for a subordinate CA under a root in AWS).
func (s *Server) ChainIncludesRoot(on bool) { s.with(func(st *state) { st.noRoot = !on }) }

// Fail answers every request with e (nil: stop failing).
func (s *Server) Fail(e *APIError) { s.with(func(st *state) { st.fail = e }) }

// Calls returns the requests accepted so far.
func (s *Server) Calls(op string) []Call {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []Call
	for _, c := range s.calls {
		if op == "" || c.Operation == op {
			out = append(out, c)
		}
	}
	return out
}

func (s *Server) with(f func(*state)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	f(&s.state)
}

func (s *Server) serve(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(io.LimitReader(r.Body, 1<<20))
	if err != nil {
		writeError(w, &APIError{http.StatusBadRequest, "SerializationException", err.Error()})
		return
	}
	region, apiErr := verifySigV4(r, body)
	if apiErr != nil {
		writeError(w, apiErr)
		return
	}
	target := r.Header.Get("X-Amz-Target")
	op, ok := strings.CutPrefix(target, "ACMPrivateCA.")
	if r.Method != http.MethodPost || r.URL.Path != "/" || !ok || r.Header.Get("Content-Type") != "application/x-amz-json-1.1" {
		writeError(w, &APIError{http.StatusBadRequest, "UnknownOperationException", "unknown operation " + target})
		return
	}
	var in map[string]any
	if err := json.Unmarshal(body, &in); err != nil {
		writeError(w, &APIError{http.StatusBadRequest, "SerializationException", err.Error()})
		return
	}
	s.mu.Lock()
	s.calls = append(s.calls, Call{Operation: op, Input: in, Region: region})
	st := s.state
	if op == "IssueCertificate" && s.state.throttle > 0 {
		s.state.throttle--
		st.fail = &APIError{http.StatusBadRequest, "ThrottlingException", "Rate exceeded"}
	}
	s.mu.Unlock()
	if st.fail != nil {
		writeError(w, st.fail)
		return
	}
	if arn, _ := in["CertificateAuthorityArn"].(string); arn != s.CAARN {
		writeError(w, &APIError{http.StatusBadRequest, "ResourceNotFoundException", fmt.Sprintf("Could not find certificate authority %s.", arn)})
		return
	}
	var out any
	switch op {
	case "GetCertificateAuthorityCertificate":
		chain := pemString(s.PKI.Root)
		if st.noRoot {
			chain = ""
		}
		out = map[string]any{"Certificate": pemString(s.PKI.Intermediate), "CertificateChain": chain}
	case "IssueCertificate":
		out, apiErr = s.issue(in, st)
	case "GetCertificate":
		out, apiErr = s.get(in)
	default:
		apiErr = &APIError{http.StatusBadRequest, "UnknownOperationException", "operation " + op + " is not supported by the fake"}
	}
	if apiErr != nil {
		writeError(w, apiErr)
		return
	}
	w.Header().Set("Content-Type", "application/x-amz-json-1.1")
	_ = json.NewEncoder(w).Encode(out)
}

// issue signs like IssueCertificate with the APIPassthrough template:
// subject and public key from the CSR, SANs from ApiPassthrough,
// end-entity key usages, validity from the request.
func (s *Server) issue(in map[string]any, st state) (any, *APIError) {
	invalid := func(msg string) (any, *APIError) {
		return nil, &APIError{http.StatusBadRequest, "ValidationException", msg}
	}
	csrB64, _ := in["Csr"].(string)
	csrPEM, err := base64.StdEncoding.DecodeString(csrB64)
	if err != nil {
		return invalid("Csr is not base64: " + err.Error())
	}
	block, _ := pem.Decode(csrPEM)
	if block == nil || block.Type != "CERTIFICATE REQUEST" {
		return nil, &APIError{http.StatusBadRequest, "MalformedCSRException", "The certificate signing request is malformed."}
	}
	csr, err := x509.ParseCertificateRequest(block.Bytes)
	if err != nil || csr.CheckSignature() != nil {
		return nil, &APIError{http.StatusBadRequest, "MalformedCSRException", "The certificate signing request is invalid."}
	}
	if alg, _ := in["SigningAlgorithm"].(string); alg != "SHA256WITHECDSA" {
		return invalid("SigningAlgorithm " + alg + " does not match the CA's key algorithm EC_prime256v1")
	}
	if tmpl, _ := in["TemplateArn"].(string); tmpl != "arn:aws:acm-pca:::template/EndEntityCertificate_APIPassthrough/V1" {
		return invalid("the fake only implements the EndEntityCertificate_APIPassthrough/V1 template, not " + tmpl)
	}
	if tok, _ := in["IdempotencyToken"].(string); tok == "" || len(tok) > 36 {
		return invalid("IdempotencyToken must be 1 to 36 characters")
	}
	notAfter, ok := absolute(in["Validity"])
	if !ok {
		return invalid("Validity must be of type ABSOLUTE in this fake")
	}
	notBefore := time.Now().Add(-time.Minute)
	if in["ValidityNotBefore"] != nil {
		if notBefore, ok = absolute(in["ValidityNotBefore"]); !ok {
			return invalid("ValidityNotBefore must be of type ABSOLUTE")
		}
	}
	if notAfter.After(s.PKI.Intermediate.NotAfter) {
		return invalid("The certificate validity specified exceeds the certificate authority validity.")
	}
	serial, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               csr.Subject,
		NotBefore:             notBefore,
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
	}
	pass, _ := in["ApiPassthrough"].(map[string]any)
	ext, _ := pass["Extensions"].(map[string]any)
	sans, _ := ext["SubjectAlternativeNames"].([]any)
	for _, e := range sans {
		gn, _ := e.(map[string]any)
		if v, ok := gn["UniformResourceIdentifier"].(string); ok && !st.stripURI {
			u, err := url.Parse(v)
			if err != nil {
				return invalid("UniformResourceIdentifier: " + err.Error())
			}
			tmpl.URIs = append(tmpl.URIs, u)
		}
		if v, ok := gn["DnsName"].(string); ok {
			tmpl.DNSNames = append(tmpl.DNSNames, v)
		}
		if v, ok := gn["IpAddress"].(string); ok {
			tmpl.IPAddresses = append(tmpl.IPAddresses, net.ParseIP(v))
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, s.PKI.Intermediate, csr.PublicKey, s.PKI.IntermediateKey)
	if err != nil {
		return nil, &APIError{http.StatusInternalServerError, "InternalFailure", err.Error()}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.seq++
	arn := fmt.Sprintf("%s/certificate/%032x", s.CAARN, s.seq)
	s.pending[arn] = &pendingCert{der: der, polls: st.inProgress}
	return map[string]any{"CertificateArn": arn}, nil
}

func (s *Server) get(in map[string]any) (any, *APIError) {
	arn, _ := in["CertificateArn"].(string)
	s.mu.Lock()
	defer s.mu.Unlock()
	p := s.pending[arn]
	if p == nil {
		return nil, &APIError{http.StatusBadRequest, "ResourceNotFoundException", "Could not find certificate " + arn + "."}
	}
	if p.polls > 0 {
		p.polls--
		return nil, &APIError{http.StatusBadRequest, "RequestInProgressException", "The request to issue certificate " + arn + " is still in progress."}
	}
	chain := pemString(s.PKI.Intermediate)
	if !s.state.noRoot {
		chain += pemString(s.PKI.Root)
	}
	return map[string]any{
		"Certificate":      string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: p.der})),
		"CertificateChain": chain,
	}, nil
}

func absolute(v any) (time.Time, bool) {
	m, _ := v.(map[string]any)
	typ, _ := m["Type"].(string)
	val, ok := m["Value"].(float64)
	if typ != "ABSOLUTE" || !ok {
		return time.Time{}, false
	}
	return time.Unix(int64(val), 0), true
}

// verifySigV4 checks the request's Signature Version 4 the way AWS does:
// it signs the same canonical request (the headers the client named as
// signed, the body's SHA-256) with the secret key and compares. It returns
// the region of the credential scope.
func verifySigV4(r *http.Request, body []byte) (string, *APIError) {
	denied := func(msg string) (string, *APIError) {
		return "", &APIError{http.StatusForbidden, "InvalidSignatureException", msg}
	}
	auth := r.Header.Get("Authorization")
	rest, ok := strings.CutPrefix(auth, "AWS4-HMAC-SHA256 ")
	if !ok {
		return "", &APIError{http.StatusForbidden, "MissingAuthenticationTokenException", "Missing Authentication Token"}
	}
	fields := map[string]string{}
	for _, f := range strings.Split(rest, ",") {
		k, v, _ := strings.Cut(strings.TrimSpace(f), "=")
		fields[k] = v
	}
	scope := strings.Split(fields["Credential"], "/")
	if len(scope) != 5 || scope[4] != "aws4_request" {
		return denied("malformed credential scope")
	}
	if scope[0] != AccessKey {
		return "", &APIError{http.StatusForbidden, "UnrecognizedClientException", "The security token included in the request is invalid."}
	}
	if scope[3] != service {
		return denied("credential should be scoped to correct service: '" + service + "'")
	}
	signingTime, err := time.Parse("20060102T150405Z", r.Header.Get("X-Amz-Date"))
	if err != nil || scope[1] != signingTime.Format("20060102") {
		return denied("X-Amz-Date missing or not the credential scope's date")
	}
	if d := time.Since(signingTime); d > 5*time.Minute || d < -5*time.Minute {
		return denied("Signature expired: the request time is too far from the server time")
	}
	sum := sha256.Sum256(body)
	payloadHash := hex.EncodeToString(sum[:])
	if h := r.Header.Get("X-Amz-Content-Sha256"); h != "" && h != payloadHash {
		return denied("X-Amz-Content-Sha256 does not match the body")
	}
	// Rebuild the request as the client signed it: the signed headers only.
	again, err := http.NewRequest(r.Method, "https://"+r.Host+r.URL.RequestURI(), nil)
	if err != nil {
		return denied(err.Error())
	}
	again.ContentLength = int64(len(body))
	for _, h := range strings.Split(fields["SignedHeaders"], ";") {
		switch h {
		case "host", "content-length":
		default:
			again.Header[http.CanonicalHeaderKey(h)] = r.Header.Values(h)
		}
	}
	creds := aws.Credentials{AccessKeyID: AccessKey, SecretAccessKey: SecretKey, SessionToken: r.Header.Get("X-Amz-Security-Token")}
	if err := v4.NewSigner().SignHTTP(context.Background(), creds, again, payloadHash, service, scope[2], signingTime); err != nil {
		return denied(err.Error())
	}
	if again.Header.Get("Authorization") != auth {
		return denied("The request signature we calculated does not match the signature you provided.")
	}
	return scope[2], nil
}

func pemString(c *x509.Certificate) string {
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw}))
}

// writeError answers like the JSON 1.1 protocol does.
func writeError(w http.ResponseWriter, e *APIError) {
	w.Header().Set("Content-Type", "application/x-amz-json-1.1")
	w.Header().Set("X-Amzn-ErrorType", e.Code)
	w.WriteHeader(e.Status)
	_ = json.NewEncoder(w).Encode(map[string]string{"__type": e.Code, "message": e.Message})
}
