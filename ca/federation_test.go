package ca

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/federation"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshproxy/meshproxy/tlsmgr"
)

// bundleURL waits for the bundle endpoint to be bound and returns its URL.
func (d *dirCA) bundleURL(t *testing.T) string {
	t.Helper()
	var url string
	waitUntil(t, 20*time.Second, "bundle endpoint bound", func() error {
		d.srv.rot.mu.Lock()
		defer d.srv.rot.mu.Unlock()
		if d.srv.rot.bundleAddr == nil {
			return errors.New("not yet")
		}
		url = "https://" + d.srv.rot.bundleAddr.String() + "/"
		return nil
	})
	return url
}

func fetch(t *testing.T, url string, trusted []*x509.Certificate, id spiffeid.ID) (*spiffebundle.Bundle, error) {
	t.Helper()
	return federation.FetchBundle(testCtx(t), clusterLocal, url,
		federation.WithSPIFFEAuth(x509bundle.FromX509Authorities(clusterLocal, trusted), id))
}

func TestFederationBundleEndpointServesEveryRootOverSPIFFETLS(t *testing.T) {
	dir := initCA(t)
	d := serveDir(t, dir, WithBundleEndpoint("127.0.0.1:0", 7*time.Second))
	url := d.bundleURL(t)
	endpointID := spiffeid.RequireFromPath(clusterLocal, ServingID)
	oldRoots := rootsOf(t, dir)

	b, err := fetch(t, url, oldRoots, endpointID)
	if err != nil {
		t.Fatalf("fetch with the bootstrap root: %v", err)
	}
	if got := b.X509Authorities(); len(got) != 1 || !got[0].Equal(oldRoots[0]) {
		t.Fatalf("bundle holds %d authorities, want the one root", len(got))
	}
	if hint, ok := b.RefreshHint(); !ok || hint != 7*time.Second {
		t.Fatalf("refresh hint %s (%v), want 7s", hint, ok)
	}
	if _, err := fetch(t, url, oldRoots, spiffeid.RequireFromPath(clusterLocal, "/ns/evil/sa/endpoint")); err == nil || !strings.Contains(err.Error(), "unexpected ID") {
		t.Fatalf("fetch expecting another endpoint ID: %v, want unexpected ID", err)
	}

	// During a root rotation the endpoint publishes both roots; after the
	// switch it is reachable with the bundle fetched during the rotation.
	rotate(t, dir, StepAdd)
	var both []*x509.Certificate
	waitUntil(t, 20*time.Second, "bundle endpoint publishes both roots", func() error {
		b, err := fetch(t, url, oldRoots, endpointID)
		if err != nil {
			return err
		}
		if both = b.X509Authorities(); len(both) != 2 {
			return fmt.Errorf("%d roots", len(both))
		}
		return nil
	})
	rotate(t, dir, StepSwitch)
	newRoot := rootsOf(t, dir)[1]
	waitUntil(t, 20*time.Second, "endpoint served under the new root", func() error {
		if _, err := fetch(t, url, []*x509.Certificate{newRoot}, endpointID); err != nil {
			return err
		}
		_, err := fetch(t, url, both, endpointID)
		return err
	})
}

func TestFederationBundleEndpointAnswersOnlyGETSlash(t *testing.T) {
	dir := initCA(t)
	d := serveDir(t, dir, WithBundleEndpoint("127.0.0.1:0", 0))
	url := d.bundleURL(t)
	pool := x509.NewCertPool()
	pool.AddCert(rootsOf(t, dir)[0])
	c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}}}
	defer c.CloseIdleConnections()
	for _, tc := range []struct {
		method, path string
		want         int
	}{
		{http.MethodGet, "", http.StatusOK},
		{http.MethodPost, "", http.StatusMethodNotAllowed},
		{http.MethodGet, "other", http.StatusNotFound},
	} {
		req, err := http.NewRequestWithContext(testCtx(t), tc.method, url+tc.path, nil)
		if err != nil {
			t.Fatal(err)
		}
		resp, err := c.Do(req)
		if err != nil {
			t.Fatalf("%s /%s: %v", tc.method, tc.path, err)
		}
		resp.Body.Close()
		if resp.StatusCode != tc.want {
			t.Errorf("%s /%s: %d, want %d", tc.method, tc.path, resp.StatusCode, tc.want)
		}
	}
	b, err := fetch(t, url, rootsOf(t, dir), spiffeid.RequireFromPath(clusterLocal, ServingID))
	if err != nil {
		t.Fatal(err)
	}
	if hint, _ := b.RefreshHint(); hint != DefaultBundleRefreshHint {
		t.Fatalf("default refresh hint %s, want %s", hint, DefaultBundleRefreshHint)
	}
}

// Sidecars derive the endpoint SPIFFE ID of a meshproxy CA from this path.
func TestFederationEndpointIDIsTheServingID(t *testing.T) {
	if ServingID != tlsmgr.DefaultBundleEndpointPath {
		t.Fatalf("ca.ServingID %q != tlsmgr.DefaultBundleEndpointPath %q", ServingID, tlsmgr.DefaultBundleEndpointPath)
	}
}
