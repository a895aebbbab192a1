package proxy

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/meshproxy/meshproxy/metrics"
	"github.com/meshproxy/meshproxy/proxy/sniff"
	"github.com/meshproxy/meshproxy/tlsmgr"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
)

// Sentinel errors of peer authorization during a handshake.
var (
	// ErrWrongIdentity means a verified peer is not the SPIFFE ID expected.
	ErrWrongIdentity = errors.New("peer has the wrong spiffe id")
	// ErrWrongTrustDomain means a verified peer is outside the trust domain expected.
	ErrWrongTrustDomain = errors.New("peer is outside the expected trust domain")
)

// Handshake results, the bounded values of the result label of
// meshproxy_handshakes_total.
const (
	ResultOK               = "ok"
	ResultNoClientCert     = "no_client_cert"
	ResultExpired          = "expired"
	ResultNotYetValid      = "not_yet_valid"
	ResultUnknownAuthority = "unknown_authority"
	ResultWrongTrustDomain = "wrong_trust_domain"
	ResultNotSPIFFE        = "not_spiffe"
	ResultCAAsLeaf         = "ca_as_leaf"
	ResultWrongIdentity    = "wrong_identity"
	ResultTLSVersion       = "tls_version"
	ResultBadHello         = "bad_hello"
	ResultTimeout          = "timeout"
	ResultOther            = "other"
)

// TLS alert codes a peer may send to explain its refusal (RFC 8446 6.2).
const (
	alertCertificateExpired  tls.AlertError = 45
	alertUnknownCA           tls.AlertError = 48
	alertProtocolVersion     tls.AlertError = 70
	alertCertificateRequired tls.AlertError = 116
)

// handshakeResult maps a handshake error from crypto/tls, crypto/x509,
// go-spiffe, tlsmgr or the sniffer to a bounded result label. go-spiffe
// reports most failures as plain wrapped strings, so some cases match text;
// the table test pins every case against the real libraries.
func handshakeResult(err error) string {
	if err == nil {
		return ResultOK
	}
	var (
		invalid  x509.CertificateInvalidError
		unknown  x509.UnknownAuthorityError
		alert    tls.AlertError
		recHdr   tls.RecordHeaderError
		netErr   net.Error
		msg      = err.Error()
		contains = func(subs ...string) bool {
			for _, s := range subs {
				if strings.Contains(msg, s) {
					return true
				}
			}
			return false
		}
	)
	switch {
	case errors.Is(err, sniff.ErrTimeout), errors.Is(err, os.ErrDeadlineExceeded),
		errors.Is(err, context.DeadlineExceeded), errors.As(err, &netErr) && netErr.Timeout():
		return ResultTimeout
	case errors.Is(err, sniff.ErrHelloTooLarge), errors.Is(err, sniff.ErrBadHello), errors.As(err, &recHdr):
		return ResultBadHello
	case errors.Is(err, ErrWrongIdentity):
		return ResultWrongIdentity
	case errors.Is(err, ErrWrongTrustDomain):
		return ResultWrongTrustDomain
	case errors.Is(err, tlsmgr.ErrNoPeerCertificate), contains("didn't provide a certificate"):
		return ResultNoClientCert
	case errors.As(err, &invalid) && invalid.Reason == x509.Expired:
		// crypto/x509 uses one reason for both ends of the validity window.
		if strings.Contains(invalid.Detail, "is before") {
			return ResultNotYetValid
		}
		return ResultExpired
	case errors.As(err, &unknown):
		return ResultUnknownAuthority
	case contains("leaf certificate with CA flag", "leaf certificate with KeyCertSign", "leaf certificate with KeyCrlSign"):
		return ResultCAAsLeaf
	case contains("no X.509 bundle"):
		return ResultWrongTrustDomain
	case contains("could not get leaf SPIFFE ID", "no URI SAN", "more than one URI SAN"):
		return ResultNotSPIFFE
	case contains("unsupported versions", "unsupported protocol version", "protocol version not supported"):
		return ResultTLSVersion
	case errors.As(err, &alert):
		switch alert {
		case alertCertificateRequired:
			return ResultNoClientCert
		case alertProtocolVersion:
			return ResultTLSVersion
		case alertCertificateExpired:
			return ResultExpired
		case alertUnknownCA:
			return ResultUnknownAuthority
		}
	}
	return ResultOther
}

// HandshakeResult maps an error of a mesh TLS handshake (or of sniffing) to
// its bounded result label, as counted in meshproxy_handshakes_total;
// ResultOK for nil. Other data planes (the gateway) label theirs with it.
func HandshakeResult(err error) string { return handshakeResult(err) }

// observeHandshake records one mesh handshake (or sniff failure) in the
// metrics and returns its result label.
func observeHandshake(direction string, start time.Time, err error) string {
	res := handshakeResult(err)
	metrics.Handshakes.WithLabelValues(direction, res).Inc()
	if !start.IsZero() {
		metrics.HandshakeDuration.Observe(time.Since(start).Seconds())
	}
	return res
}

// authorizeIDs accepts only the given SPIFFE IDs.
func authorizeIDs(ids []spiffeid.ID) tlsconfig.Authorizer {
	return func(id spiffeid.ID, _ [][]*x509.Certificate) error {
		for _, want := range ids {
			if id == want {
				return nil
			}
		}
		return fmt.Errorf("%w: got %s, want %s", ErrWrongIdentity, id, joinIDs(ids))
	}
}

// authorizeMemberOf accepts any SPIFFE ID in td.
func authorizeMemberOf(td spiffeid.TrustDomain) tlsconfig.Authorizer {
	return func(id spiffeid.ID, _ [][]*x509.Certificate) error {
		if id.MemberOf(td) {
			return nil
		}
		return fmt.Errorf("%w: got %s, want a member of %s", ErrWrongTrustDomain, id, td)
	}
}

// authorizeBundleMember accepts any SPIFFE ID whose trust domain src has a
// bundle for: every trust domain we trust, federated ones included.
func authorizeBundleMember(src tlsmgr.Source) tlsconfig.Authorizer {
	return func(id spiffeid.ID, _ [][]*x509.Certificate) error {
		if _, err := src.GetX509BundleForTrustDomain(id.TrustDomain()); err != nil {
			return fmt.Errorf("%w: %s: %v", ErrWrongTrustDomain, id, err)
		}
		return nil
	}
}

func joinIDs(ids []spiffeid.ID) string {
	s := make([]string, len(ids))
	for i, id := range ids {
		s[i] = id.String()
	}
	return strings.Join(s, " or ")
}

// maxClientConfigs bounds the outbound config cache; it is emptied when full.
const maxClientConfigs = 1024

// maxClientSessions bounds the TLS sessions kept for resumption, shared by
// every config of a ClientConfigs (keyed by SNI, else the server address).
const maxClientSessions = 1024

// ClientConfigs caches mesh client TLS configs by (SNI, expected
// identities), so each distinct destination builds its config once and
// handshakes reuse it. The sidecar's outbound side and the gateway share it.
type ClientConfigs struct {
	src tlsmgr.Source
	// sessions resumes TLS 1.3 sessions; it forgets them all when src's
	// generation changes, and VerifyConnection re-checks every resumed peer.
	sessions tls.ClientSessionCache
	mu       sync.Mutex
	m        map[string]*tls.Config
}

// NewClientConfigs returns an empty cache of configs presenting src's SVID.
func NewClientConfigs(src tlsmgr.Source) *ClientConfigs {
	return &ClientConfigs{
		src:      src,
		sessions: tlsmgr.NewClientSessionCache(src, maxClientSessions),
		m:        make(map[string]*tls.Config),
	}
}

// Get returns the config (ALPN istio) that sends sni and accepts a server
// presenting one of ids, or, if ids is empty, any member of td.
func (c *ClientConfigs) Get(sni string, ids []spiffeid.ID, td spiffeid.TrustDomain) *tls.Config {
	var key string
	if len(ids) > 0 {
		key = sni + "|id|" + joinIDs(ids)
	} else {
		key = sni + "|td|" + td.String()
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if cfg, ok := c.m[key]; ok {
		return cfg
	}
	authz := authorizeMemberOf(td)
	if len(ids) > 0 {
		authz = authorizeIDs(append([]spiffeid.ID(nil), ids...))
	}
	cfg := tlsmgr.ClientConfig(c.src, authz, tlsmgr.ALPNIstio)
	cfg.ServerName = sni
	cfg.ClientSessionCache = c.sessions
	if len(c.m) >= maxClientConfigs {
		clear(c.m)
	}
	c.m[key] = cfg
	return cfg
}

// newServerTLS builds the inbound mesh server config. Its session tickets
// are bound to src's generation and to pol's, so a session resumed after a
// trust bundle or policy change is refused and a full handshake follows.
func newServerTLS(src tlsmgr.Source, pol PolicySource) *tls.Config {
	return tlsmgr.ServerConfig(src, authorizeBundleMember(src),
		tlsmgr.WithSessionGeneration(func() uint64 {
			if pol == nil {
				return 0
			}
			if snap := pol.Current(); snap != nil {
				return snap.Generation()
			}
			return 0
		}))
}
