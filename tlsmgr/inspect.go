package tlsmgr

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// PeerReport is what Inspect learns about a peer: its SPIFFE ID, whether
// its chain verifies against the roots, the TLS parameters and the chain
// (`meshproxy inspect` prints it; the JSON names are its -o json output).
type PeerReport struct {
	Address      string      `json:"address"`
	SPIFFEID     string      `json:"spiffe_id,omitempty"`
	Verified     bool        `json:"verified"`
	VerifyError  string      `json:"verify_error,omitempty"`
	TLSVersion   string      `json:"tls_version"`
	ALPN         string      `json:"alpn"`
	CipherSuite  string      `json:"cipher_suite"`
	NotAfter     time.Time   `json:"not_after"`
	ExpiresIn    int64       `json:"expires_in_seconds"`
	Chain        []ChainCert `json:"chain"`
	ClientCertOK *bool       `json:"client_cert_accepted,omitempty"`
}

// ChainCert describes one certificate of the peer's chain.
type ChainCert struct {
	Subject   string    `json:"subject"`
	Issuer    string    `json:"issuer"`
	Serial    string    `json:"serial"`
	URIs      []string  `json:"uri_sans,omitempty"`
	DNSNames  []string  `json:"dns_sans,omitempty"`
	IsCA      bool      `json:"is_ca"`
	NotBefore time.Time `json:"not_before"`
	NotAfter  time.Time `json:"not_after"`
}

// InspectOptions shape Inspect's handshake.
type InspectOptions struct {
	Client  *tls.Certificate // presented if the peer asks; nil: an empty certificate
	ALPN    []string         // protocols offered
	SNI     string           // server name sent; empty: none
	Timeout time.Duration    // bounds connect and handshake; 0: DefaultInspectTimeout
}

// DefaultInspectTimeout bounds Inspect's connect and handshake when
// InspectOptions.Timeout is zero.
const DefaultInspectTimeout = 10 * time.Second

// Inspect handshakes with the peer at addr and reports what it presents.
// The peer's chain is verified by SPIFFE rules against roots (for the
// trust domain of the leaf's SPIFFE ID), never by hostname; a chain that
// does not verify is reported (Verified false, VerifyError), not returned
// as an error. With a client certificate it also reports whether the peer
// kept the connection after seeing it. The error is for a peer that cannot
// be reached, fails the handshake, or presents no certificate.
func Inspect(ctx context.Context, addr string, roots []*x509.Certificate, o InspectOptions) (*PeerReport, error) {
	timeout := o.Timeout
	if timeout <= 0 {
		timeout = DefaultInspectTimeout
	}
	client := o.Client
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	cfg := &tls.Config{
		MinVersion:         tls.VersionTLS12,
		NextProtos:         o.ALPN,
		ServerName:         o.SNI,
		InsecureSkipVerify: true, // verified below by SPIFFE rules against roots
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			if client == nil {
				return &tls.Certificate{}, nil
			}
			return client, nil
		},
	}
	d := tls.Dialer{Config: cfg}
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("handshake with %s: %w", addr, err)
	}
	defer conn.Close()
	tc := conn.(*tls.Conn)
	cs := tc.ConnectionState()
	res := &PeerReport{
		Address:     addr,
		TLSVersion:  tls.VersionName(cs.Version),
		ALPN:        cs.NegotiatedProtocol,
		CipherSuite: tls.CipherSuiteName(cs.CipherSuite),
	}
	if len(cs.PeerCertificates) == 0 {
		return nil, fmt.Errorf("peer %s presented no certificate", addr)
	}
	for _, c := range cs.PeerCertificates {
		cc := ChainCert{
			Subject: c.Subject.String(), Issuer: c.Issuer.String(),
			Serial: fmt.Sprintf("%x", c.SerialNumber), IsCA: c.IsCA,
			DNSNames: c.DNSNames, NotBefore: c.NotBefore, NotAfter: c.NotAfter,
		}
		for _, u := range c.URIs {
			cc.URIs = append(cc.URIs, u.String())
		}
		res.Chain = append(res.Chain, cc)
	}
	leaf := cs.PeerCertificates[0]
	res.NotAfter = leaf.NotAfter
	res.ExpiresIn = int64(time.Until(leaf.NotAfter).Seconds())
	id, err := x509svid.IDFromCert(leaf)
	if err != nil {
		res.VerifyError = fmt.Sprintf("not an SVID: %v", err)
	} else {
		res.SPIFFEID = id.String()
		bundle := x509bundle.FromX509Authorities(id.TrustDomain(), roots)
		if _, _, err := x509svid.Verify(cs.PeerCertificates, bundle); err != nil {
			res.VerifyError = err.Error()
		} else {
			res.Verified = true
		}
	}
	if client != nil {
		// TLS 1.3 servers judge the client certificate after the client's
		// handshake completes; a refusal arrives as an alert on first read.
		accepted := probeAccepted(tc)
		res.ClientCertOK = &accepted
	}
	return res, nil
}

// probeAccepted reports whether the server kept the connection after seeing
// our client certificate.
func probeAccepted(c *tls.Conn) bool {
	_ = c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	var b [1]byte
	_, err := c.Read(b[:])
	var ne net.Error
	if err == nil || (errors.As(err, &ne) && ne.Timeout()) {
		return true
	}
	return false
}
