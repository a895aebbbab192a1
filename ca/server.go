package ca

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
	pb "istio.io/api/security/v1alpha1"

	"github.com/meshproxy/meshproxy/ca/authn"
	"github.com/meshproxy/meshproxy/internal/ratelog"
	"github.com/meshproxy/meshproxy/metrics"
	"github.com/meshproxy/meshproxy/tlsmgr"
)

// DefaultServingDNS are the DNS SANs of the CA's serving certificate, so
// clients configured for istiod (or for meshproxy's own Service) verify it.
var DefaultServingDNS = []string{"istiod.istio-system.svc", "meshproxy-ca.istio-system.svc", "localhost"}

// Refusal reasons, the values of meshproxy_ca_csr_errors_total{reason}.
const (
	ReasonUnauthenticated  = "unauthenticated"
	ReasonPermissionDenied = "permission_denied"
	ReasonBadCSR           = "bad_csr"
	ReasonUnsupportedKey   = "unsupported_key"
	ReasonTTLTooLong       = "ttl_too_long"
	ReasonInternal         = "internal"
	// External signers (--signer stepca|vault): unreachable, refused, or
	// returned a certificate that breaks the identity rules.
	ReasonBackendUnavailable = "backend_unavailable"
	ReasonBackendError       = "backend_error"
	ReasonBackendInvalid     = "backend_invalid"
)

var reasons = []string{ReasonUnauthenticated, ReasonPermissionDenied, ReasonBadCSR, ReasonUnsupportedKey, ReasonTTLTooLong, ReasonInternal,
	ReasonBackendUnavailable, ReasonBackendError, ReasonBackendInvalid}

// Server serves istio.v1.auth.IstioCertificateService/CreateCertificate
// over TLS. Callers authenticate with a bearer token (the configured
// authenticators) or, to renew their own identity, with their current SVID
// as TLS client certificate.
type Server struct {
	pb.UnimplementedIstioCertificateServiceServer

	cur     atomic.Pointer[Authority] // in force; replaced on reload (rotate_server.go)
	authn   authn.Chain
	log     *slog.Logger
	serving *servingCert
	grace   time.Duration
	conn    keepalive.ServerParameters
	rot     *rotation // reload, issuance record, bundle endpoint

	maxConns int              // open connections at most; 0: no limit
	throttle *authThrottle    // failed authentications per source
	refusals *ratelog.Limiter // refusal log lines, per reason
}

// ServerOption configures a Server.
type ServerOption func(*serverOptions)

type serverOptions struct {
	log        *slog.Logger
	dns        []string
	servingTTL time.Duration
	grace      time.Duration
	rot        rotationOptions
	conn       keepalive.ServerParameters // bounds on a client connection's life
	maxConns   int
	failRate   float64
	failBurst  int
	now        func() time.Time // the throttle's clock
}

// Bounds on a client connection, so idle or stalled connections cannot
// pile up and exhaust the CA's file descriptors. Clients open a connection
// per request (tlsmgr/caclient) or reconnect on GOAWAY (istio-agent).
const (
	maxConnIdle     = 5 * time.Minute
	maxConnAge      = 30 * time.Minute
	maxConnAgeGrace = time.Minute
)

// Bounds on what one connection may ask of the CA: a request's metadata
// (headers) and the streams open at once. A CSR request needs one stream and
// well under a kilobyte of metadata (a bearer token is at most 16 KiB).
const (
	MaxHeaderListSize = 16 << 10
	MaxStreamsPerConn = 16
)

// WithMaxConnections bounds the connections open at once (0: no limit, the
// default); one past it is closed at once and counted in
// meshproxy_ca_connections_refused_total.
func WithMaxConnections(n int) ServerOption { return func(o *serverOptions) { o.maxConns = n } }

// WithAuthThrottle sets how many failed authentications a source address
// may make per second, sustained, and in a burst (default
// DefaultAuthFailRate and DefaultAuthFailBurst); past them it is refused
// with ResourceExhausted until its bucket refills. A rate of zero or less
// turns the throttle off.
func WithAuthThrottle(perSecond float64, burst int) ServerOption {
	return func(o *serverOptions) { o.failRate, o.failBurst = perSecond, burst }
}

// WithLogger sets the server's logger (default slog.Default()).
func WithLogger(l *slog.Logger) ServerOption { return func(o *serverOptions) { o.log = l } }

// WithServingDNS adds SANs to the serving certificate, besides
// DefaultServingDNS, 127.0.0.1 and ::1. An entry that parses as an IP
// address becomes an IP SAN.
func WithServingDNS(names ...string) ServerOption {
	return func(o *serverOptions) { o.dns = append(o.dns, names...) }
}

// WithServingTTL sets the serving certificate's lifetime (default 24h); it
// is renewed at half of it.
func WithServingTTL(d time.Duration) ServerOption { return func(o *serverOptions) { o.servingTTL = d } }

// WithGracePeriod bounds how long Serve waits for in-flight requests after
// its context ends (default 10s).
func WithGracePeriod(d time.Duration) ServerOption { return func(o *serverOptions) { o.grace = d } }

// ServingID is the SPIFFE ID path of the CA's own serving certificate.
const ServingID = "/ns/istio-system/sa/meshproxy-ca"

// NewServer returns a CA server signing with a and authenticating callers
// with auth, tried in order after SVID renewal (a valid client SVID).
func NewServer(a *Authority, auth []authn.Authenticator, opts ...ServerOption) (*Server, error) {
	o := serverOptions{log: slog.Default(), servingTTL: DefaultTTL, grace: 10 * time.Second,
		conn:     keepalive.ServerParameters{MaxConnectionIdle: maxConnIdle, MaxConnectionAge: maxConnAge, MaxConnectionAgeGrace: maxConnAgeGrace},
		failRate: DefaultAuthFailRate, failBurst: DefaultAuthFailBurst, now: time.Now}
	for _, opt := range opts {
		opt(&o)
	}
	dns := append([]string(nil), DefaultServingDNS...)
	ips := []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback}
	for _, n := range o.dns {
		if ip := net.ParseIP(n); ip != nil {
			ips = append(ips, ip)
			continue
		}
		if err := validDNSName(n); err != nil {
			return nil, fmt.Errorf("serving dns name %q: %w", n, err)
		}
		dns = append(dns, n)
	}
	id, err := spiffeid.FromPath(a.TrustDomain(), ServingID)
	if err != nil {
		return nil, fmt.Errorf("serving identity: %w", err)
	}
	s := &Server{log: o.log, grace: o.grace, conn: o.conn, maxConns: o.maxConns, refusals: ratelog.New(o.log, 0)}
	if o.failRate > 0 {
		s.throttle = newAuthThrottle(o.failRate, max(o.failBurst, 1), o.now)
	}
	s.cur.Store(a)
	// The bundle and the serving certificate's issuer follow reloads.
	s.authn = append(authn.Chain{authn.NewSVID(currentBundle{s})}, auth...)
	s.serving = &servingCert{
		issuer: &currentIssuer{s: s, id: id, dns: dns, ips: ips},
		csr:    x509.CertificateRequest{URIs: []*url.URL{id.URL()}, DNSNames: dns, IPAddresses: ips},
		ttl:    min(o.servingTTL, a.MaxTTL()),
		log:    o.log,
		now:    time.Now,
	}
	s.rot = newRotation(o.rot, s)
	return s, nil
}

// validDNSName accepts host names made of LDH labels, optionally with a
// leading "*." wildcard label.
func validDNSName(n string) error {
	name := strings.TrimPrefix(n, "*.")
	if name == "" || len(n) > 253 {
		return errors.New("empty or longer than 253 characters")
	}
	for _, label := range strings.Split(name, ".") {
		if label == "" || len(label) > 63 {
			return errors.New("empty or over-long label")
		}
		for i, c := range label {
			ok := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' && i > 0 && i < len(label)-1
			if !ok {
				return fmt.Errorf("invalid character %q", c)
			}
		}
	}
	return nil
}

// tlsConfig is the server side of the CA's TLS: the rotating serving
// certificate, and a client certificate requested (not required) for SVID
// renewal. crypto/tls still checks that the client holds the certificate's
// key (CertificateVerify); the chain is verified per request by the SVID
// authenticator, so a bad client certificate fails as Unauthenticated rather
// than as a handshake error, an expired one is caught even on a resumed
// session, and a token can still be used next to it.
func (s *Server) tlsConfig() *tls.Config {
	return &tls.Config{
		MinVersion:     tls.VersionTLS12,
		GetCertificate: s.serving.get,
		ClientAuth:     tls.RequestClientCert,
	}
}

// Serve issues the serving certificate, then serves the CA API on lis until
// ctx ends; it then stops gracefully (in-flight requests finish, within the
// grace period) and returns nil. It keeps the serving certificate renewed.
func (s *Server) Serve(ctx context.Context, lis net.Listener) error {
	for _, r := range reasons {
		metrics.CACSRErrors.WithLabelValues(r)
	}
	due, err := s.serving.renew(ctx)
	if err != nil {
		if ctx.Err() != nil {
			// Asked to stop before the first serving certificate: a clean stop.
			return nil
		}
		return fmt.Errorf("ca server: %w", err)
	}
	// After the first issuance: an external signer's chain is known only then.
	metrics.CARootExpiry.Set(float64(s.authority().RootsNotAfter().Unix()))
	metrics.CAChainExpiry.Set(float64(s.authority().NotAfter().Unix()))
	gs := grpc.NewServer(
		grpc.Creds(credentials.NewTLS(s.tlsConfig())),
		grpc.MaxRecvMsgSize(1<<20),
		grpc.MaxHeaderListSize(MaxHeaderListSize),
		grpc.MaxConcurrentStreams(MaxStreamsPerConn),
		grpc.ConnectionTimeout(20*time.Second),
		grpc.KeepaliveParams(s.conn),
	)
	pb.RegisterIstioCertificateServiceServer(gs, s)

	var wg sync.WaitGroup
	renewCtx, stopRenew := context.WithCancel(ctx)
	defer func() {
		stopRenew()
		wg.Wait()
	}()
	wg.Go(func() { s.serving.run(renewCtx, due) })
	if err := s.startRotation(renewCtx, &wg); err != nil {
		return fmt.Errorf("ca server: %w", err)
	}

	errc := make(chan error, 1)
	go func() { errc <- gs.Serve(newLimitListener(lis, s.maxConns, s.log)) }()
	s.log.Info("ca serving", "addr", lis.Addr().String(), "max_connections", s.maxConns, "trust_domain", s.authority().TrustDomain().Name(),
		"auth", s.authn.Name(), "signer", s.authority().SignerName(), "chain_not_after", s.authority().NotAfter().UTC().Format(time.RFC3339))

	select {
	case err := <-errc:
		return fmt.Errorf("ca server: %w", err)
	case <-ctx.Done():
	}
	s.log.Info("ca stopping")
	stopped := make(chan struct{})
	go func() {
		gs.GracefulStop()
		close(stopped)
	}()
	select {
	case <-stopped:
	case <-time.After(s.grace):
		s.log.Warn("ca grace period over; closing remaining connections", "grace", s.grace.String())
		gs.Stop()
		<-stopped
	}
	<-errc
	return nil
}

// CreateCertificate implements IstioCertificateService.
func (s *Server) CreateCertificate(ctx context.Context, req *pb.IstioCertificateRequest) (*pb.IstioCertificateResponse, error) {
	caller, addr := callerFrom(ctx)
	if wait := s.throttle.wait(addr); wait > 0 {
		return nil, s.throttled(ctx, addr, wait)
	}
	who, err := s.authn.AuthenticateResult(ctx, caller)
	if err != nil {
		if !errors.Is(err, authn.ErrUnavailable) {
			s.throttle.fail(addr)
		}
		switch {
		case errors.Is(err, authn.ErrPermissionDenied):
			return nil, s.refuse(addr, codes.PermissionDenied, ReasonPermissionDenied, err, spiffeid.ID{})
		case errors.Is(err, authn.ErrUnavailable):
			return nil, s.refuse(addr, codes.Unavailable, ReasonInternal, err, spiffeid.ID{})
		}
		return nil, s.refuse(addr, codes.Unauthenticated, ReasonUnauthenticated, err, spiffeid.ID{})
	}
	if !who.ID.MemberOf(s.authority().TrustDomain()) {
		err := fmt.Errorf("%s is outside trust domain %q", who.ID, s.authority().TrustDomain().Name())
		return nil, s.refuse(addr, codes.PermissionDenied, ReasonPermissionDenied, err, who.ID)
	}
	var ttl time.Duration
	if v := req.GetValidityDuration(); v > 0 {
		if v > int64(s.authority().MaxTTL()/time.Second) {
			err := fmt.Errorf("%w: %ds > %ds", ErrTTLTooLong, v, int64(s.authority().MaxTTL()/time.Second))
			return nil, s.refuse(addr, codes.InvalidArgument, ReasonTTLTooLong, err, who.ID)
		}
		ttl = time.Duration(v) * time.Second
	}
	issued, err := s.authority().SignChain(ctx, []byte(req.GetCsr()), who.ID, ttl)
	if err != nil {
		switch {
		case errors.Is(err, ErrBackendInvalid):
			return nil, s.refuse(addr, codes.Internal, ReasonBackendInvalid, err, who.ID)
		case errors.Is(err, ErrBackendUnavailable):
			return nil, s.refuse(addr, codes.Unavailable, ReasonBackendUnavailable, err, who.ID)
		case errors.Is(err, ErrBackendRefused):
			return nil, s.refuse(addr, codes.Internal, ReasonBackendError, err, who.ID)
		case errors.Is(err, ErrBadCSR):
			return nil, s.refuse(addr, codes.InvalidArgument, ReasonBadCSR, err, who.ID)
		case errors.Is(err, ErrUnsupportedKey):
			return nil, s.refuse(addr, codes.InvalidArgument, ReasonUnsupportedKey, err, who.ID)
		case errors.Is(err, ErrTTLTooLong):
			return nil, s.refuse(addr, codes.InvalidArgument, ReasonTTLTooLong, err, who.ID)
		case errors.Is(err, ErrOutsideTrustDomain):
			return nil, s.refuse(addr, codes.PermissionDenied, ReasonPermissionDenied, err, who.ID)
		}
		return nil, s.refuse(addr, codes.Internal, ReasonInternal, err, who.ID)
	}
	leaf := issued.Chain[0]
	metrics.CACertsIssued.Inc()
	if len(issued.Roots) > 0 {
		s.recordIssued(issued.Roots[0], leaf.NotAfter)
	}
	metrics.CAChainExpiry.Set(float64(s.authority().NotAfter().Unix()))
	s.log.Info("certificate issued", "spiffe_id", who.ID.String(), "auth", who.Method,
		"serial", fmt.Sprintf("%x", leaf.SerialNumber), "not_after", leaf.NotAfter.UTC().Format(time.RFC3339), "peer", addr)
	return &pb.IstioCertificateResponse{CertChain: responseChain(issued)}, nil
}

// responseChain is what istiod returns: the leaf, each intermediate, and the
// trust bundle last. With one root every element is one PEM certificate;
// during a root rotation the last element holds all roots, the chain's own
// first (as istiod does with a multi-root root-cert.pem).
func responseChain(issued *tlsmgr.Issued) []string {
	out := make([]string, 0, len(issued.Chain)+1)
	for _, c := range issued.Chain {
		out = append(out, string(pemCert(c.Raw)))
	}
	return append(out, string(certsPEM(issued.Roots...)))
}

// refuse logs and counts a refused request and returns its gRPC status.
func (s *Server) refuse(addr string, code codes.Code, reason string, err error, id spiffeid.ID) error {
	metrics.CACSRErrors.WithLabelValues(reason).Inc()
	attrs := []any{"reason", reason, "code", code.String(), "peer", addr, "err", err.Error()}
	if !id.IsZero() {
		attrs = append(attrs, "spiffe_id", id.String())
	}
	s.refusals.Warn(reason, "csr refused", attrs...)
	return status.Error(code, err.Error())
}

// throttled refuses a request from a source that failed authentication too
// often: ResourceExhausted with a RetryInfo detail and a retry-after header
// (whole seconds), counted and logged (sampled).
func (s *Server) throttled(ctx context.Context, addr string, wait time.Duration) error {
	metrics.CAAuthThrottled.Inc()
	secs := max(int64((wait+time.Second-1)/time.Second), 1)
	_ = grpc.SetHeader(ctx, metadata.Pairs("retry-after", strconv.FormatInt(secs, 10)))
	s.refusals.Warn("throttled", "csr refused: too many failed authentications from this address", "reason", "throttled",
		"code", codes.ResourceExhausted.String(), "peer", addr, "retry_in", wait.Round(time.Millisecond).String())
	st := status.New(codes.ResourceExhausted, fmt.Sprintf("too many failed authentications from this address; retry in %ds", secs))
	if d, err := st.WithDetails(&errdetails.RetryInfo{RetryDelay: durationpb.New(wait)}); err == nil {
		st = d
	}
	return st.Err()
}

// callerFrom collects the caller's credentials from the request context:
// the bearer token and the (unverified) TLS client certificates.
func callerFrom(ctx context.Context) (authn.Caller, string) {
	var c authn.Caller
	if md, ok := metadata.FromIncomingContext(ctx); ok {
		if v := md.Get("authorization"); len(v) > 0 {
			if scheme, tok, ok := strings.Cut(strings.TrimSpace(v[0]), " "); ok && strings.EqualFold(scheme, "Bearer") {
				c.Token = strings.TrimSpace(tok)
			}
		}
	}
	addr := ""
	if p, ok := peer.FromContext(ctx); ok {
		if p.Addr != nil {
			addr = p.Addr.String()
		}
		if info, ok := p.AuthInfo.(credentials.TLSInfo); ok {
			c.PeerCertificates = info.State.PeerCertificates
		}
	}
	return c, addr
}
