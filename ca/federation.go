package ca

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/federation"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// DefaultBundleRefreshHint is the spiffe_refresh_hint the bundle endpoint
// publishes unless told otherwise: how often federated peers should fetch
// the bundle again.
const DefaultBundleRefreshHint = 5 * time.Minute

// WithBundleEndpoint serves the SPIFFE bundle endpoint on addr: the CA's
// trust bundle (every root, several during a root rotation) as a SPIFFE
// bundle (JWKS) with the given refresh hint (≤ 0: DefaultBundleRefreshHint),
// for other trust domains that federate with this one.
//
// The endpoint uses the https_spiffe profile of the SPIFFE Trust Domain and
// Bundle specification: it is served over TLS with the CA's own serving
// certificate, an X.509-SVID for spiffe://TD/ns/istio-system/sa/meshproxy-ca
// (ServingID). A federating peer authenticates it with a bootstrap copy of
// this CA's root-cert.pem and that SPIFFE ID, and from then on with the
// bundle it fetched last, so it follows this CA's root rotations. The
// bundle tracks the authority in force, reloads included.
func WithBundleEndpoint(addr string, refreshHint time.Duration) ServerOption {
	return func(o *serverOptions) {
		if refreshHint <= 0 {
			refreshHint = DefaultBundleRefreshHint
		}
		o.rot.bundleAddr, o.rot.bundleHint = addr, refreshHint
	}
}

// BundleHandler returns the HTTP handler of the bundle endpoint: GET / answers
// the trust bundle of the authority in force with refreshHint (≤ 0: none).
func (s *Server) BundleHandler(refreshHint time.Duration) (http.Handler, error) {
	td := s.authority().TrustDomain()
	h, err := federation.NewHandler(td, endpointBundle{s: s, hint: refreshHint}, federation.WithLogger(spiffeLogger{s.log}))
	if err != nil {
		return nil, fmt.Errorf("bundle endpoint handler: %w", err)
	}
	mux := http.NewServeMux()
	mux.Handle("/{$}", h)
	return mux, nil
}

// serveBundleEndpoint serves the bundle endpoint on lis until ctx ends.
func (s *Server) serveBundleEndpoint(ctx context.Context, lis net.Listener) {
	o := s.rot.opts
	h, err := s.BundleHandler(o.bundleHint)
	if err != nil {
		s.log.Error("bundle endpoint not started", "err", err)
		_ = lis.Close()
		return
	}
	id, _ := spiffeid.FromPath(s.authority().TrustDomain(), ServingID)
	s.log.Info("bundle endpoint serving", "addr", lis.Addr().String(), "url", "https://"+lis.Addr().String()+"/",
		"profile", "https_spiffe", "endpoint_spiffe_id", id.String(), "refresh_hint", o.bundleHint.String())
	// Fetchers (go-spiffe FetchBundle) use a new transport per fetch, so a
	// kept-alive connection would only idle on both ends.
	_ = s.serveHTTPS(ctx, lis, httpsEndpoint{name: "bundle endpoint", handler: h, writeTimeout: 30 * time.Second})
}

// endpointBundle is the bundle endpoint's source: the roots of the
// authority in force.
type endpointBundle struct {
	s    *Server
	hint time.Duration
}

// GetBundleForTrustDomain implements spiffebundle.Source.
func (e endpointBundle) GetBundleForTrustDomain(td spiffeid.TrustDomain) (*spiffebundle.Bundle, error) {
	a := e.s.authority()
	if td != a.TrustDomain() {
		return nil, fmt.Errorf("no bundle for trust domain %q", td)
	}
	b := spiffebundle.FromX509Authorities(td, a.Roots())
	if e.hint > 0 {
		b.SetRefreshHint(e.hint)
	}
	return b, nil
}

// spiffeLogger adapts slog to go-spiffe's logger.
type spiffeLogger struct{ l *slog.Logger }

func (s spiffeLogger) Debugf(format string, args ...any) { s.l.Debug(fmt.Sprintf(format, args...)) }
func (s spiffeLogger) Infof(format string, args ...any)  { s.l.Info(fmt.Sprintf(format, args...)) }
func (s spiffeLogger) Warnf(format string, args ...any)  { s.l.Warn(fmt.Sprintf(format, args...)) }
func (s spiffeLogger) Errorf(format string, args ...any) { s.l.Error(fmt.Sprintf(format, args...)) }
