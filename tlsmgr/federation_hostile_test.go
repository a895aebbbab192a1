package tlsmgr

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshproxy/meshproxy/internal/testpki"
)

// startHostileBundleEndpoint serves handler over TLS with the foreign
// trust domain's bundle endpoint SVID, on loopback.
func startHostileBundleEndpoint(t *testing.T, ca *testpki.CA, handler http.HandlerFunc) (url string, id spiffeid.ID) {
	t.Helper()
	id = spiffeid.RequireFromPath(ca.TrustDomain, DefaultBundleEndpointPath)
	cert := testpki.TLSCertificate(ca.Issue(t, id.String(), time.Hour))
	srv := &http.Server{
		Handler:           handler,
		TLSConfig:         &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12},
		ReadHeaderTimeout: 10 * time.Second,
	}
	srv.SetKeepAlivesEnabled(false)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = srv.ServeTLS(ln, "", "")
	}()
	t.Cleanup(func() {
		_ = srv.Close()
		<-done
	})
	return "https://" + ln.Addr().String() + "/", id
}

// A bundle endpoint is trusted for its own trust domain's roots, not with
// the sidecar's memory: a document over the size limit is refused without
// being read to its end, and the last good bundle stays.
func TestFederatedRefusesOversizedBundleDocument(t *testing.T) {
	local := testpki.New(t, "cluster.local")
	foreign := testpki.New(t, "other.org")
	next := testpki.New(t, "other.org")
	doc, err := spiffebundle.FromX509Authorities(foreign.TrustDomain, []*x509.Certificate{next.Root}).Marshal()
	if err != nil {
		t.Fatal(err)
	}
	// Valid JSON: whitespace before the document, far past the limit.
	const padding = 4 * maxBundleFileSize
	var served atomic.Int64
	url, id := startHostileBundleEndpoint(t, foreign, func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		chunk := []byte(strings.Repeat(" ", 64<<10))
		for n := 0; n < padding; n += len(chunk) {
			if _, err := w.Write(chunk); err != nil {
				return // the client stopped reading
			}
			served.Add(int64(len(chunk)))
		}
		_, _ = w.Write(doc)
	})
	var logs syncBuffer
	f, err := NewFederated(NewStatic(local.Issue(t, "spiffe://cluster.local/ns/a/sa/b", time.Hour), local.Bundle()),
		[]FederationEndpoint{{TrustDomain: foreign.TrustDomain, URL: url, EndpointID: id, Bootstrap: foreign.Bundle()}},
		WithFederationLogger(testLogger(t, &logs)), WithFederationBackoff(time.Minute, time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	runFederated(t, f)
	waitFor(t, "the oversized bundle is refused", func() error {
		if !strings.Contains(logs.String(), "federated bundle fetch failed") {
			return errors.New("no failure logged yet")
		}
		return nil
	})
	if !strings.Contains(logs.String(), "larger than") {
		t.Errorf("the failure does not say the document is too large:\n%s", logs.String())
	}
	if roots, _ := rootsFor(f, foreign.TrustDomain); len(roots) != 1 || !roots[0].Equal(foreign.Root) {
		t.Fatal("an oversized bundle document was read and installed")
	}
	if served.Load() >= padding {
		t.Errorf("the endpoint could send all %d bytes: the fetch read past its limit", padding)
	}
}
