package authn

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"k8s.io/apimachinery/pkg/util/validation"
)

// Sentinel errors. Every failure wraps exactly one of them; the CA maps them
// to gRPC status codes.
var (
	// ErrNoCredentials: the caller presented nothing this authenticator
	// checks (for example no bearer token). It is also Unauthenticated.
	ErrNoCredentials = fmt.Errorf("%w: no credentials", ErrUnauthenticated)
	// ErrUnauthenticated: the credentials are wrong, expired or unknown.
	ErrUnauthenticated = errors.New("unauthenticated")
	// ErrPermissionDenied: the caller is authenticated but may not have an
	// identity from this CA (for example not a Kubernetes service account).
	ErrPermissionDenied = errors.New("permission denied")
	// ErrUnavailable: the authenticator could not reach its backend (the
	// Kubernetes API server, the JWKS endpoint); the caller may retry.
	ErrUnavailable = errors.New("authentication backend unavailable")
)

// Caller is what a CA client presented.
type Caller struct {
	// Token is the bearer token from the "authorization: Bearer" metadata,
	// empty if none.
	Token string
	// PeerCertificates is the TLS client certificate chain as sent (not
	// verified yet), leaf first; empty if none.
	PeerCertificates []*x509.Certificate
}

// Authenticator checks a caller's credentials and returns the SPIFFE ID the
// caller is entitled to.
type Authenticator interface {
	// Name identifies the method in logs ("token", "kubernetes", ...).
	Name() string
	// Authenticate returns the caller's SPIFFE ID or an error wrapping one
	// of the sentinel errors of this package.
	Authenticate(ctx context.Context, c Caller) (spiffeid.ID, error)
}

// Result is a successful authentication: who, and by which method.
type Result struct {
	ID     spiffeid.ID
	Method string
}

// Chain tries authenticators in order and accepts the first success.
type Chain []Authenticator

// Name implements Authenticator.
func (c Chain) Name() string {
	names := make([]string, len(c))
	for i, a := range c {
		names[i] = a.Name()
	}
	return strings.Join(names, ",")
}

// Authenticate implements Authenticator.
func (c Chain) Authenticate(ctx context.Context, caller Caller) (spiffeid.ID, error) {
	r, err := c.AuthenticateResult(ctx, caller)
	return r.ID, err
}

// AuthenticateResult is Authenticate that also says which method accepted
// the caller. When all fail, the error is the most telling one:
// PermissionDenied over Unavailable over Unauthenticated over
// NoCredentials; its message lists every method's reason.
func (c Chain) AuthenticateResult(ctx context.Context, caller Caller) (Result, error) {
	if len(c) == 0 {
		return Result{}, fmt.Errorf("%w: no authentication method configured", ErrUnauthenticated)
	}
	var (
		reasons []string
		worst   error
	)
	for _, a := range c {
		id, err := a.Authenticate(ctx, caller)
		if err == nil {
			return Result{ID: id, Method: a.Name()}, nil
		}
		if ctx.Err() != nil {
			return Result{}, fmt.Errorf("%w: %w", ErrUnavailable, ctx.Err())
		}
		reasons = append(reasons, a.Name()+": "+err.Error())
		if worst == nil || rank(err) > rank(worst) {
			worst = err
		}
	}
	return Result{}, fmt.Errorf("%w (%s)", kind(worst), strings.Join(reasons, "; "))
}

func rank(err error) int {
	switch {
	case errors.Is(err, ErrPermissionDenied):
		return 3
	case errors.Is(err, ErrUnavailable):
		return 2
	case errors.Is(err, ErrNoCredentials):
		return 0
	}
	return 1
}

func kind(err error) error {
	switch rank(err) {
	case 3:
		return ErrPermissionDenied
	case 2:
		return ErrUnavailable
	case 0:
		return ErrNoCredentials
	}
	return ErrUnauthenticated
}

// ServiceAccountID maps a Kubernetes service account user name,
// "system:serviceaccount:NS:SA", to spiffe://TD/ns/NS/sa/SA. Any other user
// name is ErrPermissionDenied: authenticated, but not a workload.
func ServiceAccountID(td spiffeid.TrustDomain, username string) (spiffeid.ID, error) {
	const prefix = "system:serviceaccount:"
	rest, ok := strings.CutPrefix(username, prefix)
	ns, sa, ok2 := strings.Cut(rest, ":")
	if !ok || !ok2 || ns == "" || sa == "" || strings.Contains(sa, ":") {
		return spiffeid.ID{}, fmt.Errorf("%w: user %q is not a service account", ErrPermissionDenied, username)
	}
	if errs := validation.IsDNS1123Label(ns); len(errs) > 0 {
		return spiffeid.ID{}, fmt.Errorf("%w: namespace %q: %s", ErrPermissionDenied, ns, strings.Join(errs, "; "))
	}
	if errs := validation.IsDNS1123Subdomain(sa); len(errs) > 0 {
		return spiffeid.ID{}, fmt.Errorf("%w: service account %q: %s", ErrPermissionDenied, sa, strings.Join(errs, "; "))
	}
	id, err := spiffeid.FromSegments(td, "ns", ns, "sa", sa)
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("%w: service account %s/%s is not a valid SPIFFE path: %w", ErrPermissionDenied, ns, sa, err)
	}
	return id, nil
}
