package vaulttest

import (
	"crypto/rand"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/meshproxy/meshproxy/internal/testpki"
)

// Server is a fake Vault with one PKI mount and one role, over TLS.
type Server struct {
	URL    string // https://127.0.0.1:PORT
	CAPEM  []byte // trusts the server's TLS certificate
	PKI    *testpki.CA
	Mount  string
	Role   string
	srv    *httptest.Server
	mu     sync.Mutex
	state  state
	signed []SignCall
}

type state struct {
	tokens     map[string]bool
	maxTTL     time.Duration
	useCSRSANs bool
	tamper     func(*x509.Certificate)
	fail       *failure
	chainRoot  bool
}

type failure struct {
	status int
	errs   []string
}

// SignCall is what a sign request carried.
type SignCall struct {
	Token string
	Body  map[string]any
}

// Start runs a fake Vault whose mount "pki" and role "meshproxy" sign with
// pki, accepting token. Like a role with max_ttl, it caps the TTL at 2160h.
func Start(t *testing.T, pki *testpki.CA, token string) *Server {
	t.Helper()
	s := &Server{PKI: pki, Mount: "pki", Role: "meshproxy"}
	s.state = state{tokens: map[string]bool{token: true}, maxTTL: 2160 * time.Hour, chainRoot: true}
	s.srv = httptest.NewUnstartedServer(http.HandlerFunc(s.serve))
	s.srv.StartTLS()
	t.Cleanup(s.srv.Close)
	s.URL = s.srv.URL
	s.CAPEM = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: s.srv.Certificate().Raw})
	return s
}

// Close stops the server: requests then fail to connect.
func (s *Server) Close() { s.srv.Close() }

// AllowToken makes token valid too (as after a token rotation).
func (s *Server) AllowToken(token string) { s.with(func(st *state) { st.tokens[token] = true }) }

// UseCSRSANs makes the role copy the CSR's SANs into the certificate
// instead of the request's uri_sans, like a role with use_csr_sans=true.
func (s *Server) UseCSRSANs(on bool) { s.with(func(st *state) { st.useCSRSANs = on }) }

// Tamper lets f change every certificate template before signing (nil:
// none), for a backend that misbehaves in other ways.
func (s *Server) Tamper(f func(*x509.Certificate)) { s.with(func(st *state) { st.tamper = f }) }

// Fail makes every request answer status with Vault's error body (0: stop
// failing). 503 with "Vault is sealed" is what a sealed Vault answers.
func (s *Server) Fail(status int, errs ...string) {
	s.with(func(st *state) {
		st.fail = nil
		if status != 0 {
			st.fail = &failure{status: status, errs: errs}
		}
	})
}

// ChainIncludesRoot sets whether ca_chain ends with the root (default yes,
// as when the issuer was imported with its full chain).
func (s *Server) ChainIncludesRoot(on bool) { s.with(func(st *state) { st.chainRoot = on }) }

// Signed returns the sign requests received so far.
func (s *Server) Signed() []SignCall {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]SignCall(nil), s.signed...)
}

func (s *Server) with(f func(*state)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	f(&s.state)
}

func (s *Server) snapshot() state {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.state
}

func (s *Server) serve(w http.ResponseWriter, r *http.Request) {
	st := s.snapshot()
	if st.fail != nil {
		writeErrors(w, st.fail.status, st.fail.errs...)
		return
	}
	switch {
	case r.Method == http.MethodGet && r.URL.Path == "/v1/"+s.Mount+"/cert/ca_chain":
		s.caChain(w, st) // unauthenticated in Vault too
	case (r.Method == http.MethodPut || r.Method == http.MethodPost) && strings.HasPrefix(r.URL.Path, "/v1/"+s.Mount+"/sign/"):
		s.sign(w, r, st)
	default:
		writeErrors(w, http.StatusNotFound)
	}
}

func (s *Server) chain(st state) []string {
	out := []string{pemString(s.PKI.Intermediate)}
	if st.chainRoot {
		out = append(out, pemString(s.PKI.Root))
	}
	return out
}

func (s *Server) caChain(w http.ResponseWriter, st state) {
	writeData(w, map[string]any{
		"certificate":     strings.Join(s.chain(st), ""),
		"revocation_time": 0,
	})
}

func (s *Server) sign(w http.ResponseWriter, r *http.Request, st state) {
	tok := r.Header.Get("X-Vault-Token")
	if !st.tokens[tok] {
		writeErrors(w, http.StatusForbidden, "permission denied")
		return
	}
	role := strings.TrimPrefix(r.URL.Path, "/v1/"+s.Mount+"/sign/")
	var body map[string]any
	if err := json.NewDecoder(io.LimitReader(r.Body, 1<<20)).Decode(&body); err != nil {
		writeErrors(w, http.StatusBadRequest, "failed to parse JSON input: "+err.Error())
		return
	}
	s.mu.Lock()
	s.signed = append(s.signed, SignCall{Token: tok, Body: body})
	s.mu.Unlock()
	if role != s.Role {
		writeErrors(w, http.StatusBadRequest, fmt.Sprintf("unknown role: %s", role))
		return
	}
	csrPEM, _ := body["csr"].(string)
	block, _ := pem.Decode([]byte(csrPEM))
	if block == nil {
		writeErrors(w, http.StatusBadRequest, "csr contains no data")
		return
	}
	csr, err := x509.ParseCertificateRequest(block.Bytes)
	if err != nil || csr.CheckSignature() != nil {
		writeErrors(w, http.StatusBadRequest, "certificate request could not be parsed")
		return
	}
	ttl := 720 * time.Hour // Vault's system default
	if v, ok := body["ttl"].(string); ok && v != "" {
		if ttl, err = time.ParseDuration(v); err != nil {
			writeErrors(w, http.StatusBadRequest, "invalid ttl: "+err.Error())
			return
		}
	}
	ttl = min(ttl, st.maxTTL)
	now := time.Now()
	serial, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		NotBefore:             now.Add(-30 * time.Second), // Vault's not_before_duration
		NotAfter:              now.Add(ttl),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageKeyAgreement | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
	}
	if st.useCSRSANs {
		tmpl.URIs, tmpl.DNSNames, tmpl.IPAddresses = csr.URIs, csr.DNSNames, csr.IPAddresses
	} else {
		for _, u := range split(body["uri_sans"]) {
			parsed, err := url.Parse(u)
			if err != nil {
				writeErrors(w, http.StatusBadRequest, "invalid uri_sans: "+err.Error())
				return
			}
			tmpl.URIs = append(tmpl.URIs, parsed)
		}
		tmpl.DNSNames = split(body["alt_names"])
		for _, ip := range split(body["ip_sans"]) {
			tmpl.IPAddresses = append(tmpl.IPAddresses, net.ParseIP(ip))
		}
	}
	if st.tamper != nil {
		st.tamper(tmpl)
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, s.PKI.Intermediate, csr.PublicKey, s.PKI.IntermediateKey)
	if err != nil {
		writeErrors(w, http.StatusInternalServerError, "error signing: "+err.Error())
		return
	}
	leaf, _ := x509.ParseCertificate(der)
	hexSerial := fmt.Sprintf("%x", leaf.SerialNumber)
	var colon []string
	for i := 0; i+2 <= len(hexSerial); i += 2 {
		colon = append(colon, hexSerial[i:i+2])
	}
	writeData(w, map[string]any{
		"certificate":      pemString(leaf),
		"issuing_ca":       pemString(s.PKI.Intermediate),
		"ca_chain":         s.chain(st),
		"serial_number":    strings.Join(colon, ":"),
		"expiration":       leaf.NotAfter.Unix(),
		"private_key_type": "",
	})
}

func split(v any) []string {
	s, _ := v.(string)
	var out []string
	for _, e := range strings.Split(s, ",") {
		if e = strings.TrimSpace(e); e != "" {
			out = append(out, e)
		}
	}
	return out
}

func pemString(c *x509.Certificate) string {
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw}))
}

// writeData answers like Vault does for a successful logical request.
func writeData(w http.ResponseWriter, data map[string]any) {
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(map[string]any{
		"request_id":     "6c1a3b0e-0000-4000-8000-000000000000",
		"lease_id":       "",
		"renewable":      false,
		"lease_duration": 0,
		"data":           data,
		"wrap_info":      nil,
		"warnings":       nil,
		"auth":           nil,
	})
}

// writeErrors answers like Vault does for a refused request.
func writeErrors(w http.ResponseWriter, status int, errs ...string) {
	if errs == nil {
		errs = []string{}
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(map[string]any{"errors": errs})
}
