package authn

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"slices"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Bounds on what the authenticators accept and read.
const (
	maxBearerToken   = 16 << 10
	maxAPIResponse   = 1 << 20
	tokenReviewsPath = "/apis/authentication.k8s.io/v1/tokenreviews"
)

// tokenReview is authentication.k8s.io/v1 TokenReview as it travels on the
// wire, reduced to the fields the CA sends and reads. It mirrors
// k8s.io/api/authentication/v1 (the tests' fake API server decodes it
// strictly into those types) without linking the Kubernetes API machinery
// into the binary.
type tokenReview struct {
	APIVersion string            `json:"apiVersion"`
	Kind       string            `json:"kind"`
	Spec       tokenReviewSpec   `json:"spec"`
	Status     tokenReviewStatus `json:"status"`
}

type tokenReviewSpec struct {
	Token     string   `json:"token,omitempty"`
	Audiences []string `json:"audiences,omitempty"`
}

type tokenReviewStatus struct {
	Authenticated bool     `json:"authenticated,omitempty"`
	User          userInfo `json:"user"`
	Audiences     []string `json:"audiences,omitempty"`
	Error         string   `json:"error,omitempty"`
}

type userInfo struct {
	Username string `json:"username,omitempty"`
}

// Kubernetes authenticates Kubernetes service account tokens with a
// TokenReview: the API server says whether the token is valid (signature,
// expiry, and that its pod still exists) and for which audiences. A token
// must be authenticated for the audience (default "istio-ca"); the service
// account system:serviceaccount:NS:SA becomes spiffe://TD/ns/NS/sa/SA.
type Kubernetes struct {
	api     *KubeAPI
	td      spiffeid.TrustDomain
	aud     string
	timeout time.Duration
	log     *slog.Logger
}

// NewKubernetes returns a TokenReview authenticator for trust domain td.
func NewKubernetes(api *KubeAPI, td spiffeid.TrustDomain, opts ...Option) *Kubernetes {
	o := newOptions(opts)
	return &Kubernetes{api: api, td: td, aud: o.audience, timeout: o.requestTimeout, log: o.log}
}

// Name implements Authenticator.
func (k *Kubernetes) Name() string { return "kubernetes" }

// Authenticate implements Authenticator.
func (k *Kubernetes) Authenticate(ctx context.Context, c Caller) (spiffeid.ID, error) {
	if c.Token == "" {
		return spiffeid.ID{}, fmt.Errorf("%w: no bearer token", ErrNoCredentials)
	}
	if len(c.Token) > maxBearerToken {
		return spiffeid.ID{}, fmt.Errorf("%w: bearer token longer than %d bytes", ErrUnauthenticated, maxBearerToken)
	}
	review := tokenReview{
		APIVersion: "authentication.k8s.io/v1",
		Kind:       "TokenReview",
		Spec:       tokenReviewSpec{Token: c.Token, Audiences: []string{k.aud}},
	}
	body, err := json.Marshal(&review)
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("%w: encode token review: %w", ErrUnavailable, err)
	}
	ctx, cancel := context.WithTimeout(ctx, k.timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "", bytes.NewReader(body))
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("%w: %w", ErrUnavailable, err)
	}
	req.URL = &url.URL{Path: tokenReviewsPath}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "application/json")
	resp, err := k.api.Do(req)
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("%w: token review at %s: %w", ErrUnavailable, k.api.Server(), err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, maxAPIResponse+1))
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("%w: token review response: %w", ErrUnavailable, err)
	}
	if len(data) > maxAPIResponse {
		return spiffeid.ID{}, fmt.Errorf("%w: token review response larger than %d bytes", ErrUnavailable, maxAPIResponse)
	}
	if resp.StatusCode != http.StatusCreated && resp.StatusCode != http.StatusOK {
		// 401/403 here mean the CA's own credentials or RBAC are wrong, not
		// the caller's: the caller can retry once that is fixed.
		k.log.Error("token review refused by the API server", "server", k.api.Server(), "status", resp.StatusCode, "body", snippet(data))
		return spiffeid.ID{}, fmt.Errorf("%w: token review: API server answered %s", ErrUnavailable, resp.Status)
	}
	var out tokenReview
	if err := json.Unmarshal(data, &out); err != nil {
		return spiffeid.ID{}, fmt.Errorf("%w: decode token review: %w", ErrUnavailable, err)
	}
	st := out.Status
	if !st.Authenticated {
		msg := st.Error
		if msg == "" {
			msg = "token not authenticated"
		}
		return spiffeid.ID{}, fmt.Errorf("%w: kubernetes: %s", ErrUnauthenticated, msg)
	}
	if !slices.Contains(st.Audiences, k.aud) {
		return spiffeid.ID{}, fmt.Errorf("%w: token is not for audience %q (token audiences %v)", ErrUnauthenticated, k.aud, st.Audiences)
	}
	return ServiceAccountID(k.td, st.User.Username)
}

func snippet(b []byte) string {
	const n = 256
	if len(b) > n {
		return string(b[:n]) + "..."
	}
	return string(b)
}
