package ca

import (
	"context"
	"crypto/tls"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"golang.org/x/net/netutil"
)

// httpsEndpoint is an HTTPS listener of the CA beside its gRPC API, served
// with the CA's own serving certificate.
type httpsEndpoint struct {
	name         string
	handler      http.Handler
	clientAuth   tls.ClientAuthType
	writeTimeout time.Duration
	keepAlive    bool
}

// serveHTTPS serves e on lis until ctx ends, then shuts down within 5s.
// It returns nil once stopped by ctx.
func (s *Server) serveHTTPS(ctx context.Context, lis net.Listener, e httpsEndpoint) error {
	srv := &http.Server{
		Handler:           e.handler,
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       30 * time.Second,
		WriteTimeout:      e.writeTimeout,
		IdleTimeout:       2 * time.Minute,
		MaxHeaderBytes:    16 << 10,
		TLSConfig:         &tls.Config{MinVersion: tls.VersionTLS12, GetCertificate: s.serving.get, ClientAuth: e.clientAuth},
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
	}
	srv.SetKeepAlivesEnabled(e.keepAlive)
	errc := make(chan error, 1)
	go func() { errc <- srv.ServeTLS(lis, "", "") }()
	select {
	case err := <-errc:
		if !errors.Is(err, http.ErrServerClosed) {
			s.log.Error(e.name+" stopped", "error", err)
			return err
		}
		return nil
	case <-ctx.Done():
	}
	shutCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := srv.Shutdown(shutCtx); err != nil {
		_ = srv.Close()
	}
	<-errc
	return nil
}

// MaxConfigConnections bounds the config endpoint's open connections (one
// long poll per sidecar); more wait in the listen backlog.
const MaxConfigConnections = 8192

// ConfigWriteTimeout bounds one answer of the config endpoint; long polls
// (ca/mirror, at most a minute) finish well within it.
const ConfigWriteTimeout = 2 * time.Minute

// ServeConfig serves h — the Istio config mirror (ca/mirror) — over TLS on
// lis until ctx ends, with the CA's serving certificate (an SVID for
// ServingID) and a client certificate requested, so h can authenticate the
// caller's SVID against TrustBundle. At most MaxConfigConnections are open
// at once. The serving certificate is issued when
// Serve starts; handshakes before that fail and the client retries.
func (s *Server) ServeConfig(ctx context.Context, lis net.Listener, h http.Handler) error {
	s.log.Info("istio config endpoint serving", "addr", lis.Addr().String())
	return s.serveHTTPS(ctx, netutil.LimitListener(lis, MaxConfigConnections), httpsEndpoint{
		name: "istio config endpoint", handler: h, clientAuth: tls.RequestClientCert,
		writeTimeout: ConfigWriteTimeout, keepAlive: true,
	})
}

// TrustBundle is the trust bundle of the authority in force; it follows
// reloads and root rotation.
func (s *Server) TrustBundle() x509bundle.Source { return currentBundle{s} }
