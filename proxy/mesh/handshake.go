package mesh

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
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

// HandshakeResult maps an error of a mesh TLS handshake (or of sniffing)
// from crypto/tls, crypto/x509, go-spiffe, tlsmgr or the sniffer to its
// bounded result label, as counted in meshproxy_handshakes_total; ResultOK
// for nil. go-spiffe reports most failures as plain wrapped strings, so
// some cases match text; the table test pins every case against the real
// libraries.
func HandshakeResult(err error) string {
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

// ObserveHandshake records one mesh handshake (or sniff failure) in the
// metrics and returns its result label. A zero start records no duration.
func ObserveHandshake(direction string, start time.Time, err error) string {
	res := HandshakeResult(err)
	metrics.Handshakes.WithLabelValues(direction, res).Inc()
	if !start.IsZero() {
		metrics.HandshakeDuration.Observe(time.Since(start).Seconds())
	}
	return res
}

// HandshakeError is a failed mesh handshake with its result label, which
// its message starts with.
type HandshakeError struct {
	Result string
	Err    error
}

func (e *HandshakeError) Error() string { return e.Result + ": " + e.Err.Error() }
func (e *HandshakeError) Unwrap() error { return e.Err }

// AuthorizeIDs accepts only the given SPIFFE IDs.
func AuthorizeIDs(ids []spiffeid.ID) tlsconfig.Authorizer {
	return func(id spiffeid.ID, _ [][]*x509.Certificate) error {
		for _, want := range ids {
			if id == want {
				return nil
			}
		}
		return fmt.Errorf("%w: got %s, want %s", ErrWrongIdentity, id, JoinIDs(ids))
	}
}

// AuthorizeMemberOf accepts any SPIFFE ID in td.
func AuthorizeMemberOf(td spiffeid.TrustDomain) tlsconfig.Authorizer {
	return func(id spiffeid.ID, _ [][]*x509.Certificate) error {
		if id.MemberOf(td) {
			return nil
		}
		return fmt.Errorf("%w: got %s, want a member of %s", ErrWrongTrustDomain, id, td)
	}
}

// AuthorizeBundleMember accepts any SPIFFE ID whose trust domain src has a
// bundle for: every trust domain we trust, federated ones included.
func AuthorizeBundleMember(src tlsmgr.Source) tlsconfig.Authorizer {
	return func(id spiffeid.ID, _ [][]*x509.Certificate) error {
		if _, err := src.GetX509BundleForTrustDomain(id.TrustDomain()); err != nil {
			return fmt.Errorf("%w: %s: %v", ErrWrongTrustDomain, id, err)
		}
		return nil
	}
}

// JoinIDs lists ids for messages and cache keys.
func JoinIDs(ids []spiffeid.ID) string {
	s := make([]string, len(ids))
	for i, id := range ids {
		s[i] = id.String()
	}
	return strings.Join(s, " or ")
}
