// Package catest runs a meshproxy CA server on loopback for the tests of
// other packages (the signer backends): started on a free port, stopped
// when the test ends, and ready only once it serves TLS.
package catest

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"net"
	"testing"
	"time"

	"github.com/meshproxy/meshproxy/ca"
)

// Serve starts srv on a loopback port and returns its address once it
// answers TLS with a certificate for "localhost" chaining to roots (with an
// external signer the backend must first issue the CA's own certificate);
// the test fails if that takes longer than within.
// The server is stopped when the test ends; the test fails if Serve then
// returns an error or does not return within 30 s.
func Serve(t testing.TB, srv *ca.Server, roots []*x509.Certificate, within time.Duration) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, lis) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Serve: %v", err)
			}
		case <-time.After(30 * time.Second):
			t.Error("Serve did not return after cancel")
		}
	})
	addr := lis.Addr().String()
	pool := x509.NewCertPool()
	for _, r := range roots {
		pool.AddCert(r)
	}
	conf := &tls.Config{RootCAs: pool, ServerName: "localhost", NextProtos: []string{"h2"}, MinVersion: tls.VersionTLS12}
	deadline := time.Now().Add(within)
	for {
		select {
		case err := <-done:
			done <- err
			t.Fatalf("CA server stopped before serving: %v", err)
		default:
		}
		c, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr, conf)
		if err == nil {
			c.Close()
			return addr
		}
		if time.Now().After(deadline) {
			t.Fatalf("CA server not serving after %s: %v", within, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
