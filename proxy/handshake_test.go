package proxy

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"testing"
	"time"

	"github.com/meshproxy/meshproxy/internal/testpki"
	"github.com/meshproxy/meshproxy/proxy/mesh"
	"github.com/meshproxy/meshproxy/proxy/sniff"
	"github.com/meshproxy/meshproxy/tlsmgr"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// handshakePair runs a handshake between a client and a server config over
// loopback and returns both sides' errors.
func handshakePair(t *testing.T, client, server *tls.Config) (clientErr, serverErr error) {
	t.Helper()
	a, b := tcpPair(t)
	_ = a.SetDeadline(time.Now().Add(clientWait))
	_ = b.SetDeadline(time.Now().Add(clientWait))
	done := make(chan error, 1)
	go func() {
		sc := tls.Server(b, server)
		err := sc.Handshake()
		if err == nil {
			// TLS 1.3 clients finish before the server has checked them; read
			// so a refusal reaches the client as an alert.
			_, err = sc.Read(make([]byte, 1))
			if errors.Is(err, io.EOF) {
				err = nil
			}
		}
		sc.Close()
		done <- err
	}()
	cc := tls.Client(a, client)
	clientErr = cc.Handshake()
	if clientErr == nil {
		_ = cc.CloseWrite()
		_, clientErr = cc.Read(make([]byte, 1)) // the server's verdict on our cert
		if errors.Is(clientErr, io.EOF) {
			clientErr = nil
		}
	}
	a.Close()
	return clientErr, <-done
}

func TestHandshakeResultMapsRealErrors(t *testing.T) {
	m := newMesh(t)
	server := m.identity(t, echoID)
	serverCfg := tlsmgr.ServerConfig(server, mesh.AuthorizeBundleMember(server))
	now := time.Now()

	// clientWith is a mesh client presenting svid.
	clientWith := func(svid *x509svid.SVID) *tls.Config {
		return tlsmgr.ClientConfig(tlsmgr.NewStatic(svid, m.ca.Bundle()), nil)
	}
	foreignCA := testpki.New(t, "cluster.local") // same trust domain name, other root
	otherTD := testpki.New(t, "other.example")

	serverSide := func(client *tls.Config) func(*testing.T) error {
		return func(t *testing.T) error { _, err := handshakePair(t, client, serverCfg); return err }
	}
	clientSide := func(client, srv *tls.Config) func(*testing.T) error {
		return func(t *testing.T) error { err, _ := handshakePair(t, client, srv); return err }
	}
	deadlineErr := func(*testing.T) error {
		a, _ := tcpPair(t)
		_ = a.SetReadDeadline(time.Now().Add(time.Millisecond))
		_, err := a.Read(make([]byte, 1))
		return err
	}
	recordHeaderErr := func(t *testing.T) error {
		a, b := tcpPair(t)
		go func() { _, _ = io.WriteString(a, "GET / HTTP/1.1\r\n\r\n") }()
		_ = b.SetDeadline(time.Now().Add(clientWait))
		return tls.Server(b, serverCfg).Handshake()
	}
	errOf := func(err error) func(*testing.T) error { return func(*testing.T) error { return err } }

	tests := []struct {
		name string
		err  func(*testing.T) error
		want string
	}{
		{"good peer", serverSide(clientWith(m.ca.Issue(t, webID, time.Hour))), mesh.ResultOK},
		{"client without certificate", serverSide(&tls.Config{InsecureSkipVerify: true, NextProtos: []string{"istio"}}), mesh.ResultNoClientCert},
		{"no peer certificate (tlsmgr)", errOf(fmt.Errorf("verify: %w", tlsmgr.ErrNoPeerCertificate)), mesh.ResultNoClientCert},
		{"expired client", serverSide(clientWith(m.ca.IssueLeaf(t, testpki.Leaf{ID: webID, NotBefore: now.Add(-3 * time.Hour), TTL: time.Hour}))), mesh.ResultExpired},
		{"client not yet valid", serverSide(clientWith(m.ca.IssueLeaf(t, testpki.Leaf{ID: webID, NotBefore: now.Add(time.Hour)}))), mesh.ResultNotYetValid},
		{"client from an unknown CA", serverSide(clientWith(foreignCA.Issue(t, webID, time.Hour))), mesh.ResultUnknownAuthority},
		{"client from an untrusted trust domain", serverSide(clientWith(otherTD.Issue(t, "spiffe://other.example/ns/a/sa/b", time.Hour))), mesh.ResultWrongTrustDomain},
		{"client without a SPIFFE ID", serverSide(clientWith(m.ca.IssueLeaf(t, testpki.Leaf{DNSNames: []string{"web"}}))), mesh.ResultNotSPIFFE},
		{"CA certificate used as leaf", serverSide(clientWith(m.ca.IssueLeaf(t, testpki.Leaf{ID: webID, IsCA: true}))), mesh.ResultCAAsLeaf},
		{"client offers only TLS 1.2", serverSide(&tls.Config{InsecureSkipVerify: true, MaxVersion: tls.VersionTLS12}), mesh.ResultTLSVersion},
		{"server with the wrong identity", clientSide(tlsmgr.ClientConfig(m.identity(t, webID), mesh.AuthorizeIDs([]spiffeid.ID{mustID(t, otherID)})), serverCfg), mesh.ResultWrongIdentity},
		{"server outside our trust domain", clientSide(tlsmgr.ClientConfig(m.identity(t, webID), mesh.AuthorizeMemberOf(mustID(t, "spiffe://example.org/x").TrustDomain())), serverCfg), mesh.ResultWrongTrustDomain},
		{"server refuses our certificate (alert)", errOf(fmt.Errorf("read: %w", tls.AlertError(116))), mesh.ResultNoClientCert},
		{"server refuses our version (alert)", errOf(tls.AlertError(70)), mesh.ResultTLSVersion},
		{"plaintext where TLS was expected", recordHeaderErr, mesh.ResultBadHello},
		{"oversized hello", errOf(sniff.ErrHelloTooLarge), mesh.ResultBadHello},
		{"malformed hello", errOf(fmt.Errorf("%w: x", sniff.ErrBadHello)), mesh.ResultBadHello},
		{"half-sent hello", errOf(sniff.ErrTimeout), mesh.ResultTimeout},
		{"socket deadline", deadlineErr, mesh.ResultTimeout},
		{"handshake context deadline", errOf(fmt.Errorf("handshake: %w", context.DeadlineExceeded)), mesh.ResultTimeout},
		{"peer hung up", errOf(io.EOF), mesh.ResultOther},
		{"unknown alert", errOf(tls.AlertError(80)), mesh.ResultOther},
		{"x509 other invalid reason", errOf(x509.CertificateInvalidError{Reason: x509.NotAuthorizedToSign}), mesh.ResultOther},
		{"anything else", errOf(errors.New("boom")), mesh.ResultOther},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.err(t)
			if got := mesh.HandshakeResult(err); got != tt.want {
				t.Fatalf("mesh.HandshakeResult(%v) = %q, want %q", err, got, tt.want)
			}
		})
	}
}
