package remote_test

import (
	"context"
	"crypto/tls"
	"io"
	"log/slog"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/meshproxy/meshproxy/ca/mirror"
	"github.com/meshproxy/meshproxy/internal/testpki"
	"github.com/meshproxy/meshproxy/policy/remote"
)

const servingID = "spiffe://cluster.local/ns/istio-system/sa/meshproxy-ca"

type source struct {
	*x509svid.SVID
	*x509bundle.Bundle
}

func discard() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// serve runs the config endpoint of m with a serving SVID for id.
func serve(t *testing.T, pki *testpki.CA, m *mirror.Mirror, id string) string {
	t.Helper()
	ts := httptest.NewUnstartedServer(mirror.NewHandler(m, pki.Bundle(), mirror.WithHandlerLogger(discard())))
	ts.TLS = &tls.Config{Certificates: []tls.Certificate{testpki.TLSCertificate(pki.Issue(t, id, time.Hour))}, ClientAuth: tls.RequestClientCert}
	ts.StartTLS()
	t.Cleanup(ts.Close)
	return ts.Listener.Addr().String()
}

func syncer(t *testing.T, pki *testpki.CA, addr, dir string) *remote.Syncer {
	t.Helper()
	wl := source{pki.Issue(t, "spiffe://cluster.local/ns/web/sa/api", time.Hour), pki.Bundle()}
	s, err := remote.New(addr, spiffeid.RequireFromString(servingID), wl, dir, remote.WithLogger(discard()), remote.WithWait(time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestNotSyncedServerKeepsTheLastDocuments(t *testing.T) {
	pki := testpki.New(t, "cluster.local")
	dir := t.TempDir()
	old := []byte("# from an earlier run\n")
	if err := os.WriteFile(filepath.Join(dir, remote.FileName), old, 0o644); err != nil {
		t.Fatal(err)
	}
	s := syncer(t, pki, serve(t, pki, mirror.New(nil, mirror.WithLogger(discard())), servingID), dir)
	if !s.HasFile() {
		t.Fatal("HasFile is false with the earlier run's file in place")
	}
	_, err := s.Sync(context.Background())
	if err == nil || !strings.Contains(err.Error(), "503") || !strings.Contains(err.Error(), "not synced") {
		t.Fatalf("Sync = %v, want the server's 503 and its reason", err)
	}
	if got, _ := os.ReadFile(s.Path()); string(got) != string(old) {
		t.Errorf("file rewritten to %q while the server was not ready", got)
	}
}

func TestServerMustPresentTheCAIdentity(t *testing.T) {
	pki := testpki.New(t, "cluster.local")
	// A synced mirror of no resources serves an empty set.
	m := mirror.New(nil, mirror.WithLogger(discard()), mirror.WithResources())
	s := syncer(t, pki, serve(t, pki, m, "spiffe://cluster.local/ns/web/sa/impostor"), t.TempDir())
	if _, err := s.Sync(context.Background()); err == nil || !strings.Contains(err.Error(), "impostor") {
		t.Fatalf("Sync = %v, want the unexpected server ID refused", err)
	}
	if s.HasFile() {
		t.Error("documents written from a server that is not the CA")
	}
}

func TestWritesOnlyWhenTheDocumentsChange(t *testing.T) {
	pki := testpki.New(t, "cluster.local")
	m := mirror.New(nil, mirror.WithLogger(discard()), mirror.WithResources())
	dir := filepath.Join(t.TempDir(), "created")
	s := syncer(t, pki, serve(t, pki, m, servingID), dir)
	if changed, err := s.Sync(context.Background()); err != nil || !changed {
		t.Fatalf("first Sync: changed %v, err %v", changed, err)
	}
	st1, err := os.Stat(s.Path())
	if err != nil {
		t.Fatal(err)
	}
	if changed, err := s.Sync(context.Background()); err != nil || changed {
		t.Fatalf("second Sync: changed %v, err %v; want unchanged", changed, err)
	}
	st2, err := os.Stat(s.Path())
	if err != nil {
		t.Fatal(err)
	}
	if !os.SameFile(st1, st2) {
		t.Error("the file was replaced although nothing changed")
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Errorf("dir holds %d entries, want only %s (no temporary files left)", len(entries), remote.FileName)
	}
}

func TestRejectsBadArguments(t *testing.T) {
	pki := testpki.New(t, "cluster.local")
	wl := source{pki.Issue(t, "spiffe://cluster.local/ns/web/sa/api", time.Hour), pki.Bundle()}
	if _, err := remote.New("no-port", spiffeid.RequireFromString(servingID), wl, t.TempDir()); err == nil {
		t.Error("address without port accepted")
	}
	if _, err := remote.New("127.0.0.1:1", spiffeid.ID{}, wl, t.TempDir()); err == nil {
		t.Error("empty server ID accepted")
	}
}
