package ca

import (
	"context"
	"io"
	"net"
	"net/http"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// The config endpoint presents the CA's serving SVID and hands the handler
// the caller's client certificate, verifiable against TrustBundle.
func TestServeConfigIsMutualTLSWithTheServingIdentity(t *testing.T) {
	dir := t.TempDir()
	if err := Init(dir, clusterLocal); err != nil {
		t.Fatal(err)
	}
	a, err := Load(dir)
	if err != nil {
		t.Fatal(err)
	}
	srv, err := NewServer(a, nil, WithLogger(quietLogger()))
	if err != nil {
		t.Fatal(err)
	}
	serveForTest(t, srv)

	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		id, _, err := x509svid.Verify(r.TLS.PeerCertificates, srv.TrustBundle())
		if err != nil {
			http.Error(w, err.Error(), http.StatusUnauthorized)
			return
		}
		_, _ = io.WriteString(w, id.String())
	})
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.ServeConfig(ctx, lis, h) }()

	key := p256(t)
	caller := spiffeid.RequireFromString("spiffe://cluster.local/ns/web/sa/api")
	issued, err := a.SignChain(context.Background(), csrPEM(csrDER(t, key, nil)), caller, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	svid := &x509svid.SVID{ID: caller, Certificates: issued.Chain, PrivateKey: key}
	serving := spiffeid.RequireFromPath(clusterLocal, ServingID)
	client := &http.Client{Transport: &http.Transport{TLSClientConfig: tlsconfig.MTLSClientConfig(svid, a.Bundle(), tlsconfig.AuthorizeID(serving))}}
	defer client.CloseIdleConnections()

	var body []byte
	var status int
	for range 100 { // the serving certificate is issued as Serve starts
		resp, err := client.Get("https://" + lis.Addr().String() + "/")
		if err != nil {
			time.Sleep(50 * time.Millisecond)
			continue
		}
		body, _ = io.ReadAll(resp.Body)
		status = resp.StatusCode
		resp.Body.Close()
		break
	}
	if status != http.StatusOK || string(body) != caller.String() {
		t.Fatalf("answer %d %q, want 200 naming %s", status, body, caller)
	}
	cancel()
	if err := <-done; err != nil {
		t.Errorf("ServeConfig after cancel: %v", err)
	}
}
