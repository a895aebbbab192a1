package proxy

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"slices"

	"github.com/meshproxy/meshproxy/internal/fileread"
	"github.com/meshproxy/meshproxy/policy"
	"github.com/meshproxy/meshproxy/proxy/conntrack"
	"github.com/meshproxy/meshproxy/proxy/mesh"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// ModeTLSOrigination labels connections the sidecar wrapped in TLS for a
// DestinationRule's SIMPLE or MUTUAL mode.
const ModeTLSOrigination = "tls_origination"

// WithCredentialsDir sets where a DestinationRule's tls.credentialName is
// found: NAME.crt (client chain), NAME.key and NAME-ca.crt (server roots),
// as for the gateway.
func WithCredentialsDir(dir string) Option {
	return func(o *options) { o.credentialsDir = dir }
}

// originateTLS wraps the app's plaintext connection down in TLS to dest as
// o says (files read per connection, so replaced files apply to the next).
// A failure refuses the connection: it is never sent in plaintext.
func (p *Proxy) originateTLS(t *conntrack.Conn, down net.Conn, dest string, o *policy.Origination, pool *policy.TCPPool) {
	cfg, err := p.originationConfig(o)
	if err != nil {
		p.refuse(t, refusal{mode: ModeTLSOrigination, decision: DecisionHandshakeFailed, dest: dest, err: err})
		return
	}
	up, err := p.dialPool(t, dest, pool)
	if err != nil {
		p.refuse(t, refusal{mode: ModeTLSOrigination, decision: DecisionUnreachable, dest: dest, err: err})
		return
	}
	tc := tls.Client(up, cfg)
	ctx, cancel := context.WithTimeout(t.Context(), p.opts.HandshakeTimeout)
	err = mesh.Handshake(ctx, tc)
	cancel()
	if err != nil {
		_ = up.Close()
		p.refuse(t, refusal{mode: ModeTLSOrigination, decision: DecisionHandshakeFailed, dest: dest, err: fmt.Errorf("tls origination: %w", err)})
		return
	}
	p.pipe(t, down, tc, dest, ModeTLSOrigination, spiffeid.ID{})
}

// originationConfig builds the client TLS config of o. Verification is
// done in VerifyConnection: the chain against the roots (the CA file, the
// credential's CA, else the system's), then the server's name against
// subjectAltNames, else the SNI; insecureSkipVerify skips both.
func (p *Proxy) originationConfig(o *policy.Origination) (*tls.Config, error) {
	caFile, certFile, keyFile := o.CACertificates, o.ClientCertificate, o.PrivateKey
	if o.CredentialName != "" {
		if p.opts.credentialsDir == "" {
			return nil, fmt.Errorf("credentialName %q: the sidecar has no --credentials-dir", o.CredentialName)
		}
		base := filepath.Join(p.opts.credentialsDir, o.CredentialName)
		caFile = base + "-ca.crt"
		if o.Mutual {
			certFile, keyFile = base+".crt", base+".key"
		}
		if _, err := os.Stat(caFile); errors.Is(err, os.ErrNotExist) {
			caFile = "" // the system roots, as Istio without a CA in the secret
		}
	}
	cfg := &tls.Config{ServerName: o.SNI, MinVersion: tls.VersionTLS12, InsecureSkipVerify: true} //nolint:gosec // verified in VerifyConnection
	if o.Mutual {
		certPEM, err := fileread.Read(certFile, fileread.MaxPEM)
		if err != nil {
			return nil, err
		}
		keyPEM, err := fileread.Read(keyFile, fileread.MaxPEM)
		if err != nil {
			return nil, err
		}
		cert, err := tls.X509KeyPair(certPEM, keyPEM)
		if err != nil {
			return nil, fmt.Errorf("client certificate %s: %w", certFile, err) // never the key's content
		}
		cfg.Certificates = []tls.Certificate{cert}
	}
	if o.InsecureSkipVerify {
		return cfg, nil
	}
	var roots *x509.CertPool
	if caFile != "" {
		pem, err := fileread.Read(caFile, fileread.MaxPEM)
		if err != nil {
			return nil, err
		}
		roots = x509.NewCertPool()
		if !roots.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("caCertificates %s: no PEM certificate", caFile)
		}
	}
	sans, sni := slices.Clone(o.SubjectAltNames), o.SNI
	cfg.VerifyConnection = func(cs tls.ConnectionState) error {
		if len(cs.PeerCertificates) == 0 {
			return errors.New("server presented no certificate")
		}
		leaf := cs.PeerCertificates[0]
		inter := x509.NewCertPool()
		for _, c := range cs.PeerCertificates[1:] {
			inter.AddCert(c)
		}
		if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err != nil {
			return err
		}
		switch {
		case len(sans) > 0:
			if !matchesSAN(leaf, sans) {
				return fmt.Errorf("server certificate matches none of subjectAltNames %v", sans)
			}
		case sni != "":
			return leaf.VerifyHostname(sni)
		}
		return nil
	}
	return cfg, nil
}

// matchesSAN reports whether leaf carries one of sans as a DNS name
// (wildcards as in Go's hostname check), a URI or an IP address.
func matchesSAN(leaf *x509.Certificate, sans []string) bool {
	for _, s := range sans {
		if u, err := url.Parse(s); err == nil && u.Scheme != "" {
			for _, uri := range leaf.URIs {
				if uri.String() == s {
					return true
				}
			}
			continue
		}
		if ip, err := netip.ParseAddr(s); err == nil {
			for _, c := range leaf.IPAddresses {
				if a, ok := netip.AddrFromSlice(c); ok && a.Unmap() == ip.Unmap() {
					return true
				}
			}
			continue
		}
		if leaf.VerifyHostname(s) == nil {
			return true
		}
	}
	return false
}
