package tlsmgr

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"strconv"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// ALPN protocols of Istio's mesh mTLS.
const (
	ALPNIstio     = "istio"
	ALPNIstioHTTP = "istio-http/1.1"
	ALPNIstioH2   = "istio-h2"
)

// ServerALPN is what an inbound mesh listener accepts, in preference order.
var ServerALPN = []string{ALPNIstio, ALPNIstioHTTP, ALPNIstioH2, "istio-peer-exchange"}

// ServerConfig builds a TLS 1.3 server config that presents src's current
// certificate and requires a client SVID that chains to src's bundles and
// satisfies authz. Verification runs in VerifyConnection, which crypto/tls
// calls on every handshake, resumed ones included.
func ServerConfig(src Source, authz tlsconfig.Authorizer) *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		NextProtos: ServerALPN,
		ClientAuth: tls.RequireAnyClientCert,
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
			return src.Certificate()
		},
		VerifyConnection: func(cs tls.ConnectionState) error {
			_, err := verifyPeer(src, authz, cs.PeerCertificates)
			return err
		},
	}
}

// ClientConfig builds a TLS 1.3 client config that presents src's current
// certificate, offers ALPN alpn (default "istio") and accepts a server only
// if its SVID chains to src's bundles and satisfies authz. Hostnames are
// never checked: mesh peers are identified by SPIFFE ID. ServerName is
// empty (no SNI); set it to OutboundSNI(host, port) to send Istio's SNI.
// Verification runs in VerifyConnection on every handshake, resumed ones
// included, so a cached session never outlives a trust bundle change.
func ClientConfig(src Source, authz tlsconfig.Authorizer, alpn ...string) *tls.Config {
	if len(alpn) == 0 {
		alpn = []string{ALPNIstio}
	}
	return &tls.Config{
		MinVersion:         tls.VersionTLS13,
		NextProtos:         alpn,
		InsecureSkipVerify: true, // replaced by the SPIFFE check in VerifyConnection
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			return src.Certificate()
		},
		VerifyConnection: func(cs tls.ConnectionState) error {
			_, err := verifyPeer(src, authz, cs.PeerCertificates)
			return err
		},
	}
}

// OutboundSNI is the SNI Istio clients send to a mesh destination,
// "outbound_.<port>_._.<host>"; set it as ClientConfig(...).ServerName. It is
// only a routing hint: the server is still verified by SPIFFE ID alone.
func OutboundSNI(host string, port uint16) string {
	return "outbound_." + strconv.Itoa(int(port)) + "_._." + host
}

// ErrNoPeerCertificate is returned when the peer presented no certificate.
var ErrNoPeerCertificate = errors.New("peer presented no certificate")

func verifyPeer(src Source, authz tlsconfig.Authorizer, certs []*x509.Certificate) (spiffeid.ID, error) {
	if len(certs) == 0 {
		return spiffeid.ID{}, ErrNoPeerCertificate
	}
	id, chains, err := x509svid.Verify(certs, src)
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("verify peer svid: %w", err)
	}
	if authz != nil {
		if err := authz(id, chains); err != nil {
			return id, fmt.Errorf("authorize peer %s: %w", id, err)
		}
	}
	return id, nil
}

// PeerID returns the SPIFFE ID of a verified peer from its connection state.
func PeerID(cs tls.ConnectionState) (spiffeid.ID, error) {
	if len(cs.PeerCertificates) == 0 {
		return spiffeid.ID{}, ErrNoPeerCertificate
	}
	return x509svid.IDFromCert(cs.PeerCertificates[0])
}
