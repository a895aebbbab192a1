package certmanager

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/meshproxy/meshproxy/ca"
	"github.com/meshproxy/meshproxy/ca/authn"
	"github.com/meshproxy/meshproxy/tlsmgr"
)

// cert-manager's API group and the defaults of an issuerRef.
const (
	Group       = "cert-manager.io"
	KindIssuer  = "Issuer"
	KindCluster = "ClusterIssuer"
)

// Limits on the exchange with the API server.
const (
	defaultTimeout = 30 * time.Second
	minPoll        = 100 * time.Millisecond
	maxPoll        = 2 * time.Second
	maxBody        = 1 << 20
	deleteTimeout  = 10 * time.Second
)

var dnsLabel = regexp.MustCompile(`^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`)

// IssuerRef names the cert-manager issuer that signs: an Issuer in the
// signer's namespace, a ClusterIssuer, or an external issuer of another
// group (awspca.cert-manager.io, cas-issuer.jetstack.io, ...).
type IssuerRef struct {
	Name  string `json:"name"`
	Kind  string `json:"kind,omitempty"`
	Group string `json:"group,omitempty"`
}

// Option configures a Signer.
type Option func(*options)

type options struct {
	log     *slog.Logger
	approve bool
	timeout time.Duration
}

// WithLogger sets the signer's logger (default slog.Default()).
func WithLogger(l *slog.Logger) Option { return func(o *options) { o.log = l } }

// WithApprove has meshproxy approve its own CertificateRequests (it has
// authenticated the caller already). Without it, cert-manager's built-in
// approver or approver-policy must approve them. Approving needs the
// `approve` verb on the issuer's signer name, when cert-manager's webhook
// enforces it.
func WithApprove(on bool) Option { return func(o *options) { o.approve = on } }

// WithTimeout bounds a Sign call that has no earlier deadline (default 30s).
func WithTimeout(d time.Duration) Option { return func(o *options) { o.timeout = d } }

// Signer has cert-manager sign certificates through CertificateRequests.
// It implements ca.Signer and is safe for concurrent use.
type Signer struct {
	api       *authn.KubeAPI
	namespace string
	issuer    IssuerRef
	roots     []*x509.Certificate
	approve   bool
	timeout   time.Duration
	log       *slog.Logger
}

var _ ca.Signer = (*Signer)(nil)

// New returns a Signer that creates CertificateRequests in namespace for
// issuer through api, trusting roots (the issuer's root CA: the trust
// bundle, and what issued certificates must chain to).
func New(api *authn.KubeAPI, namespace string, issuer IssuerRef, roots []*x509.Certificate, opts ...Option) (*Signer, error) {
	o := options{log: slog.Default(), timeout: defaultTimeout}
	for _, opt := range opts {
		opt(&o)
	}
	if !dnsLabel.MatchString(namespace) || len(namespace) > 63 {
		return nil, fmt.Errorf("namespace %q is not a Kubernetes namespace name", namespace)
	}
	if issuer.Name == "" || strings.ContainsAny(issuer.Name, "/ ") {
		return nil, fmt.Errorf("issuer name %q: want the name of a cert-manager issuer", issuer.Name)
	}
	if issuer.Kind == "" {
		issuer.Kind = KindIssuer
	}
	if issuer.Group == "" {
		issuer.Group = Group
	}
	if len(roots) == 0 {
		return nil, errors.New("cert-manager signer: the issuer's root certificate is required")
	}
	return &Signer{api: api, namespace: namespace, issuer: issuer, roots: slices.Clone(roots),
		approve: o.approve, timeout: o.timeout, log: o.log}, nil
}

// Name implements ca.Signer.
func (s *Signer) Name() string { return ca.SignerCertManager }

// Roots implements ca.Signer.
func (s *Signer) Roots() []*x509.Certificate { return slices.Clone(s.roots) }

// Close releases idle connections to the API server.
func (s *Signer) Close() { s.api.CloseIdleConnections() }

// certificateRequest is the part of a cert-manager.io/v1 CertificateRequest
// meshproxy writes and reads.
type certificateRequest struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Metadata   struct {
		Name         string            `json:"name,omitempty"`
		GenerateName string            `json:"generateName,omitempty"`
		Namespace    string            `json:"namespace,omitempty"`
		Labels       map[string]string `json:"labels,omitempty"`
		Annotations  map[string]string `json:"annotations,omitempty"`
	} `json:"metadata"`
	Spec struct {
		Request   []byte    `json:"request"`
		IssuerRef IssuerRef `json:"issuerRef"`
		Duration  string    `json:"duration,omitempty"`
		Usages    []string  `json:"usages,omitempty"`
		IsCA      bool      `json:"isCA"`
	} `json:"spec"`
	Status struct {
		Conditions  []condition `json:"conditions,omitempty"`
		Certificate []byte      `json:"certificate,omitempty"`
		CA          []byte      `json:"ca,omitempty"`
	} `json:"status"`
}

type condition struct {
	Type    string `json:"type"`
	Status  string `json:"status"`
	Reason  string `json:"reason,omitempty"`
	Message string `json:"message,omitempty"`
}

func (cr *certificateRequest) condition(typ string) *condition {
	for i := range cr.Status.Conditions {
		if cr.Status.Conditions[i].Type == typ {
			return &cr.Status.Conditions[i]
		}
	}
	return nil
}

// Sign implements ca.Signer.
func (s *Signer) Sign(ctx context.Context, req *ca.SignRequest) ([]*x509.Certificate, error) {
	if err := checkCSR(req); err != nil {
		return nil, err
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, s.timeout)
		defer cancel()
	}
	cr := &certificateRequest{APIVersion: Group + "/v1", Kind: "CertificateRequest"}
	cr.Metadata.GenerateName = "meshproxy-"
	cr.Metadata.Labels = map[string]string{"app.kubernetes.io/managed-by": "meshproxy"}
	cr.Metadata.Annotations = map[string]string{"meshproxy.io/spiffe-id": req.ID.String()}
	cr.Spec.Request = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: req.CSR.Raw})
	cr.Spec.IssuerRef = s.issuer
	cr.Spec.Duration = strconv.FormatInt(int64(req.TTL/time.Second), 10) + "s"
	cr.Spec.Usages = []string{"digital signature", "key encipherment", "server auth", "client auth"}
	var created certificateRequest
	if err := s.call(ctx, http.MethodPost, s.path(""), "application/json", cr, &created); err != nil {
		return nil, fmt.Errorf("create a CertificateRequest in namespace %s: %w", s.namespace, err)
	}
	name := created.Metadata.Name
	defer s.delete(name)
	if s.approve {
		patch := map[string]any{"status": map[string]any{"conditions": []condition{{
			Type: "Approved", Status: "True", Reason: "meshproxy.io",
			Message: "caller authenticated by meshproxy as " + req.ID.String(),
		}}}}
		if err := s.call(ctx, http.MethodPatch, s.path(name)+"/status", "application/merge-patch+json", patch, nil); err != nil {
			return nil, fmt.Errorf("approve CertificateRequest %s/%s: %w", s.namespace, name, err)
		}
	}
	done, err := s.wait(ctx, name)
	if err != nil {
		return nil, err
	}
	certs, err := tlsmgr.ParseCertificatesPEM(done.Status.Certificate)
	if err != nil {
		return nil, fmt.Errorf("%w: CertificateRequest %s/%s: status.certificate: %w", ca.ErrBackendInvalid, s.namespace, name, err)
	}
	if len(done.Status.CA) > 0 {
		more, err := tlsmgr.ParseCertificatesPEM(done.Status.CA)
		if err != nil {
			return nil, fmt.Errorf("%w: CertificateRequest %s/%s: status.ca: %w", ca.ErrBackendInvalid, s.namespace, name, err)
		}
		certs = append(certs, more...)
	}
	s.log.Debug("cert-manager signed", "spiffe_id", req.ID.String(), "certificaterequest", s.namespace+"/"+name)
	return certs, nil
}

// wait polls the request until it is Ready, denied or failed.
func (s *Signer) wait(ctx context.Context, name string) (*certificateRequest, error) {
	poll := minPoll
	var cr certificateRequest
	for {
		cr = certificateRequest{}
		if err := s.call(ctx, http.MethodGet, s.path(name), "", nil, &cr); err != nil {
			return nil, fmt.Errorf("read CertificateRequest %s/%s: %w", s.namespace, name, err)
		}
		if c := cr.condition("Denied"); c != nil && c.Status == "True" {
			return nil, fmt.Errorf("%w: CertificateRequest %s/%s denied: %s: %s", ca.ErrBackendRefused, s.namespace, name, c.Reason, c.Message)
		}
		if c := cr.condition("InvalidRequest"); c != nil && c.Status == "True" {
			return nil, fmt.Errorf("%w: CertificateRequest %s/%s invalid: %s: %s", ca.ErrBackendRefused, s.namespace, name, c.Reason, c.Message)
		}
		if c := cr.condition("Ready"); c != nil {
			switch {
			case c.Status == "True" && len(cr.Status.Certificate) > 0:
				return &cr, nil
			case c.Status == "False" && c.Reason == "Failed":
				return nil, fmt.Errorf("%w: CertificateRequest %s/%s failed: %s", ca.ErrBackendRefused, s.namespace, name, c.Message)
			}
		}
		t := time.NewTimer(poll)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, fmt.Errorf("%w: CertificateRequest %s/%s not ready before the deadline (%s)", ca.ErrBackendUnavailable, s.namespace, name, describeConditions(&cr, s.approve))
		case <-t.C:
		}
		poll = min(2*poll, maxPoll)
	}
}

func describeConditions(cr *certificateRequest, approve bool) string {
	if len(cr.Status.Conditions) == 0 {
		if approve {
			return "no conditions: is cert-manager running?"
		}
		return "no conditions: is cert-manager running, and does an approver approve meshproxy's requests?"
	}
	var parts []string
	for _, c := range cr.Status.Conditions {
		parts = append(parts, fmt.Sprintf("%s=%s %s: %s", c.Type, c.Status, c.Reason, c.Message))
	}
	return strings.Join(parts, "; ")
}

// delete removes a request that served its purpose, even after the
// caller gave up; a failure only leaves it for cert-manager's or an
// operator's garbage collection.
func (s *Signer) delete(name string) {
	ctx, cancel := context.WithTimeout(context.Background(), deleteTimeout)
	defer cancel()
	if err := s.call(ctx, http.MethodDelete, s.path(name), "", nil, nil); err != nil {
		s.log.Warn("could not delete CertificateRequest", "certificaterequest", s.namespace+"/"+name, "error", err)
	}
}

func (s *Signer) path(name string) string {
	p := "/apis/" + Group + "/v1/namespaces/" + url.PathEscape(s.namespace) + "/certificaterequests"
	if name != "" {
		p += "/" + url.PathEscape(name)
	}
	return p
}

// call sends one API request; out, when not nil, receives the JSON answer.
// No answer, 429 and 5xx are ErrBackendUnavailable; other error statuses
// ErrBackendRefused, with the API server's message.
func (s *Signer) call(ctx context.Context, method, path, contentType string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, path, body)
	if err != nil {
		return err
	}
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	req.Header.Set("Accept", "application/json")
	resp, err := s.api.Do(req)
	if err != nil {
		return fmt.Errorf("%w: %s: %w", ca.ErrBackendUnavailable, s.api.Server(), err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, maxBody))
	if err != nil {
		return fmt.Errorf("%w: %s: %w", ca.ErrBackendUnavailable, s.api.Server(), err)
	}
	if resp.StatusCode >= 300 {
		var st struct{ Message string }
		msg := strings.TrimSpace(string(data))
		if json.Unmarshal(data, &st) == nil && st.Message != "" {
			msg = st.Message
		}
		if len(msg) > 512 {
			msg = msg[:512] + "…"
		}
		kind := ca.ErrBackendRefused
		if resp.StatusCode == http.StatusTooManyRequests || resp.StatusCode >= 500 {
			kind = ca.ErrBackendUnavailable
		}
		return fmt.Errorf("%w: %d %s: %s", kind, resp.StatusCode, http.StatusText(resp.StatusCode), msg)
	}
	if out != nil {
		if err := json.Unmarshal(data, out); err != nil {
			return fmt.Errorf("%w: decode the API server's answer: %w", ca.ErrBackendRefused, err)
		}
	}
	return nil
}

// checkCSR refuses CSRs cert-manager would not sign for exactly the
// caller: cert-manager certifies the CSR's own SANs.
func checkCSR(req *ca.SignRequest) error {
	c := req.CSR
	if len(c.URIs) != 1 || c.URIs[0].String() != req.ID.String() {
		return fmt.Errorf("%w: --signer certmanager signs the CSR as it is, so its only URI SAN must be the caller's SPIFFE ID %s (the CSR has %v)",
			ca.ErrBadCSR, req.ID, c.URIs)
	}
	if len(c.EmailAddresses) > 0 {
		return fmt.Errorf("%w: the CSR carries email SANs", ca.ErrBadCSR)
	}
	for _, n := range c.DNSNames {
		if !slices.Contains(req.DNSNames, n) {
			return fmt.Errorf("%w: the CSR carries DNS SAN %q", ca.ErrBadCSR, n)
		}
	}
	for _, ip := range c.IPAddresses {
		if !slices.ContainsFunc(req.IPAddresses, ip.Equal) {
			return fmt.Errorf("%w: the CSR carries IP SAN %s", ca.ErrBadCSR, ip)
		}
	}
	return nil
}
