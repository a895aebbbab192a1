package tlsmgr

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/meshproxy/meshproxy/internal/fileread"
	"github.com/meshproxy/meshproxy/internal/testpki"
	"github.com/meshproxy/meshproxy/metrics"
)

// svidFiles writes chain, key (PKCS#8) and bundle PEM files into dir.
type svidFiles struct{ cert, key, bundle string }

func writeSVIDFiles(t *testing.T, dir string, chain []*x509.Certificate, key crypto.Signer, roots ...*x509.Certificate) svidFiles {
	t.Helper()
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	f := svidFiles{filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem"), filepath.Join(dir, "bundle.pem")}
	testpki.WriteFile(t, f.cert, testpki.PEMCerts(chain...))
	testpki.WriteFile(t, f.key, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}))
	testpki.WriteFile(t, f.bundle, testpki.PEMCerts(roots...))
	return f
}

func writeSVID(t *testing.T, dir string, ca *testpki.CA, s *x509svid.SVID) svidFiles {
	t.Helper()
	return writeSVIDFiles(t, dir, s.Certificates, s.PrivateKey, ca.Root)
}

func runFileSource(t *testing.T, s *FileSource) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = s.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			t.Error("Run did not return after cancel")
		}
	})
}

func serialOf(t *testing.T, src Source) string {
	t.Helper()
	c, err := src.Certificate()
	if err != nil {
		t.Fatal(err)
	}
	return c.Leaf.SerialNumber.String()
}

func TestFileSourceRefusesBadFilesNamingThem(t *testing.T) {
	ca := testpki.New(t, "cluster.local")
	other := testpki.New(t, "cluster.local")
	good := ca.Issue(t, serverID, time.Hour)
	stranger := ca.Issue(t, clientID, time.Hour)

	tests := []struct {
		name   string
		setup  func(t *testing.T, dir string) svidFiles
		names  string // which file the error must name: cert, key or bundle
		wantIs error
		want   string
	}{
		{"key of another certificate", func(t *testing.T, dir string) svidFiles {
			return writeSVIDFiles(t, dir, good.Certificates, stranger.PrivateKey, ca.Root)
		}, "cert+key", ErrKeyMismatch, "does not match"},
		{"certificate without spiffe id", func(t *testing.T, dir string) svidFiles {
			s := ca.IssueLeaf(t, testpki.Leaf{DNSNames: []string{"web.example"}})
			return writeSVIDFiles(t, dir, s.Certificates, s.PrivateKey, ca.Root)
		}, "cert", ErrNoSPIFFEID, "no URI SAN"},
		{"certificate of an untrusted ca", func(t *testing.T, dir string) svidFiles {
			return writeSVID(t, dir, ca, other.Issue(t, serverID, time.Hour))
		}, "cert", nil, "verify chain"},
		{"expired certificate", func(t *testing.T, dir string) svidFiles {
			return writeSVID(t, dir, ca, ca.IssueLeaf(t, testpki.Leaf{ID: serverID, NotBefore: time.Now().Add(-2 * time.Hour), TTL: time.Hour}))
		}, "cert", ErrExpired, "expired at"},
		{"bundle is not pem", func(t *testing.T, dir string) svidFiles {
			f := writeSVID(t, dir, ca, good)
			testpki.WriteFile(t, f.bundle, []byte("not a bundle"))
			return f
		}, "bundle", nil, "no PEM CERTIFICATE"},
		{"bundle holds a leaf, not a ca", func(t *testing.T, dir string) svidFiles {
			return writeSVIDFiles(t, dir, good.Certificates, good.PrivateKey, good.Certificates[0])
		}, "bundle", nil, "not a CA certificate"},
		{"key file holds a certificate", func(t *testing.T, dir string) svidFiles {
			f := writeSVID(t, dir, ca, good)
			testpki.WriteFile(t, f.key, testpki.PEMCerts(ca.Root))
			return f
		}, "key", nil, "want a private key"},
		{"missing key file", func(t *testing.T, dir string) svidFiles {
			f := writeSVID(t, dir, ca, good)
			if err := os.Remove(f.key); err != nil {
				t.Fatal(err)
			}
			return f
		}, "key", os.ErrNotExist, "no such file"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := tt.setup(t, t.TempDir())
			_, err := NewFileSource(f.cert, f.key, f.bundle)
			if err == nil {
				t.Fatal("bad files accepted")
			}
			if tt.wantIs != nil && !errors.Is(err, tt.wantIs) {
				t.Errorf("error %q is not %v", err, tt.wantIs)
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("error %q does not mention %q", err, tt.want)
			}
			for _, which := range strings.Split(tt.names, "+") {
				path := map[string]string{"cert": f.cert, "key": f.key, "bundle": f.bundle}[which]
				if !strings.Contains(err.Error(), path) {
					t.Errorf("error %q does not name the %s file %s", err, which, path)
				}
			}
		})
	}
	t.Run("empty path", func(t *testing.T) {
		if _, err := NewFileSource("", "k", "b"); err == nil || !strings.Contains(err.Error(), "cert file") {
			t.Fatalf("err = %v, want it to name the cert file", err)
		}
	})
}

func TestFileSourceServesRSAAndECKeysInEveryFormat(t *testing.T) {
	ca := testpki.New(t, "cluster.local")
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	ecKey := testpki.NewKey(t)
	sec1, err := x509.MarshalECPrivateKey(ecKey)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		key  crypto.Signer
		pem  []byte // nil: PKCS#8
	}{
		{"ecdsa pkcs8", ecKey, nil},
		{"ecdsa sec1", ecKey, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: sec1})},
		{"rsa pkcs8", rsaKey, nil},
		{"rsa pkcs1", rsaKey, pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(rsaKey)})},
	}
	peer := NewStatic(ca.Issue(t, clientID, time.Hour), ca.Bundle())
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := ca.IssueLeaf(t, testpki.Leaf{ID: serverID, Key: tt.key})
			f := writeSVID(t, t.TempDir(), ca, s)
			if tt.pem != nil {
				testpki.WriteFile(t, f.key, tt.pem)
			}
			src, err := NewFileSource(f.cert, f.key, f.bundle)
			if err != nil {
				t.Fatal(err)
			}
			if got, _ := src.GetX509SVID(); got.ID.String() != serverID {
				t.Fatalf("id = %s", got.ID)
			}
			server := startServer(t, ServerConfig(src, authorizeID(clientID)))
			if _, err := server.roundTrip(ClientConfig(peer, authorizeID(serverID))); err != nil {
				t.Fatalf("handshake with the file identity: %v", err)
			}
			if st := src.Status(); st.Source != "files" || st.ID.String() != serverID || len(st.Bundles) != 1 {
				t.Fatalf("status = %+v", st)
			}
		})
	}
}

// TestFileSourceReloadKeepsOldOnBadFilesThenSwaps: good → bad keeps the old
// identity (and says so in metrics and Status) → good swaps.
func TestFileSourceReloadKeepsOldOnBadFilesThenSwaps(t *testing.T) {
	ca := testpki.New(t, "cluster.local")
	dir := t.TempDir()
	first := ca.Issue(t, serverID, time.Hour)
	f := writeSVID(t, dir, ca, first)
	src, err := NewFileSource(f.cert, f.key, f.bundle, WithPollInterval(time.Hour), WithLogger(testLogger(t, nil)))
	if err != nil {
		t.Fatal(err)
	}
	changed, unsubscribe := src.Subscribe()
	defer unsubscribe()
	runFileSource(t, src)
	oldSerial, gen := serialOf(t, src), src.Generation()

	failures := func() float64 { return testutil.ToFloat64(metrics.ConfigReloads.WithLabelValues("cert", "failure")) }
	rotFailures := func() float64 { return testutil.ToFloat64(metrics.CertRotations.WithLabelValues("failure")) }
	before, rotBefore := failures(), rotFailures()

	// Bad: a new certificate with the old key.
	second := ca.Issue(t, serverID, time.Hour)
	testpki.WriteFile(t, f.cert, testpki.PEMCerts(second.Certificates...))
	deadline := time.Now().Add(30 * time.Second)
	for failures() == before {
		if time.Now().After(deadline) {
			t.Fatal("bad reload was not counted in config_reloads_total{kind=cert,result=failure}")
		}
		time.Sleep(20 * time.Millisecond)
	}
	// Counted right after config_reloads_total, so it may trail it by a moment.
	for rotFailures() == rotBefore {
		if time.Now().After(deadline) {
			t.Fatal("bad reload not counted in cert_rotations_total{result=failure}")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if got := serialOf(t, src); got != oldSerial || src.Generation() != gen {
		t.Fatal("a bad reload replaced the identity")
	}
	if err := src.Ready(); err != nil {
		t.Fatalf("Ready() = %v while the old certificate is valid", err)
	}
	if st := src.Status(); !strings.Contains(st.LastError, f.cert) || !strings.Contains(st.LastError, "does not match") {
		t.Fatalf("Status().LastError = %q, want the mismatch naming %s", st.LastError, f.cert)
	}
	if err := src.Rotate(context.Background()); err == nil || !strings.Contains(err.Error(), f.key) {
		t.Fatalf("Rotate() = %v, want the mismatch naming %s", err, f.key)
	}

	// Good again: the matching key arrives.
	drain(changed)
	writeSVID(t, dir, ca, second)
	waitGeneration(t, src, changed, gen+1)
	if got := serialOf(t, src); got != second.Certificates[0].SerialNumber.String() {
		t.Fatalf("serving serial %s, want the new certificate's %s", got, second.Certificates[0].SerialNumber)
	}
	if st := src.Status(); st.LastError != "" {
		t.Fatalf("LastError = %q after a good reload", st.LastError)
	}
}

// TestFileSourceFollowsKubernetesSymlinkSwap reproduces how the kubelet
// updates a secret volume: files are symlinks through ..data, which is
// atomically renamed to a new timestamped directory.
func TestFileSourceFollowsKubernetesSymlinkSwap(t *testing.T) {
	ca := testpki.New(t, "cluster.local")
	dir := t.TempDir()
	version := func(name string, s *x509svid.SVID) {
		d := filepath.Join(dir, name)
		if err := os.Mkdir(d, 0o700); err != nil {
			t.Fatal(err)
		}
		writeSVID(t, d, ca, s)
	}
	first, second := ca.Issue(t, serverID, time.Hour), ca.Issue(t, serverID, time.Hour)
	version("..2026_01_01_00_00_00.1", first)
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.Symlink("..2026_01_01_00_00_00.1", filepath.Join(dir, "..data")))
	for _, n := range []string{"cert.pem", "key.pem", "bundle.pem"} {
		must(os.Symlink(filepath.Join("..data", n), filepath.Join(dir, n)))
	}
	src, err := NewFileSource(filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem"), filepath.Join(dir, "bundle.pem"),
		WithPollInterval(time.Hour), WithLogger(testLogger(t, nil)))
	must(err)
	changed, unsubscribe := src.Subscribe()
	defer unsubscribe()
	runFileSource(t, src)
	gen := src.Generation()

	version("..2026_01_01_01_00_00.2", second)
	must(os.Symlink("..2026_01_01_01_00_00.2", filepath.Join(dir, "..data_tmp")))
	must(os.Rename(filepath.Join(dir, "..data_tmp"), filepath.Join(dir, "..data")))
	must(os.RemoveAll(filepath.Join(dir, "..2026_01_01_00_00_00.1")))

	waitGeneration(t, src, changed, gen+1)
	if got := serialOf(t, src); got != second.Certificates[0].SerialNumber.String() {
		t.Fatalf("serving serial %s after the swap, want %s", got, second.Certificates[0].SerialNumber)
	}
}

// TestFileSourcePeriodicCheckCatchesUnnotifiedChange: when the watched
// directory is itself swapped behind a symlink, no notification arrives;
// the periodic check still picks up the new files.
func TestFileSourcePeriodicCheckCatchesUnnotifiedChange(t *testing.T) {
	ca := testpki.New(t, "cluster.local")
	root := t.TempDir()
	first, second := ca.Issue(t, serverID, time.Hour), ca.Issue(t, serverID, time.Hour)
	for i, s := range []*x509svid.SVID{first, second} {
		d := filepath.Join(root, fmt.Sprintf("v%d", i+1))
		if err := os.Mkdir(d, 0o700); err != nil {
			t.Fatal(err)
		}
		writeSVID(t, d, ca, s)
	}
	link := filepath.Join(root, "certs")
	if err := os.Symlink("v1", link); err != nil {
		t.Fatal(err)
	}
	clock := &fakeClock{pollEvery: time.Hour, poll: make(chan time.Time), armed: make(chan struct{}, 1)}
	src, err := NewFileSource(filepath.Join(link, "cert.pem"), filepath.Join(link, "key.pem"), filepath.Join(link, "bundle.pem"),
		WithPollInterval(time.Hour), WithClock(clock), WithLogger(testLogger(t, nil)))
	if err != nil {
		t.Fatal(err)
	}
	changed, unsubscribe := src.Subscribe()
	defer unsubscribe()
	runFileSource(t, src)
	gen := src.Generation()
	// Run has made its first check and waits for the poll.
	select {
	case <-clock.armed:
	case <-time.After(30 * time.Second):
		t.Fatal("Run never waited for the poll interval")
	}

	if err := os.Symlink("v2", link+".tmp"); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(link+".tmp", link); err != nil {
		t.Fatal(err)
	}
	select {
	case clock.poll <- time.Now():
	case <-time.After(30 * time.Second):
		t.Fatal("Run never waited for the poll interval")
	}
	waitGeneration(t, src, changed, gen+1)
	if got := serialOf(t, src); got != second.Certificates[0].SerialNumber.String() {
		t.Fatalf("serving serial %s, want %s", got, second.Certificates[0].SerialNumber)
	}
}

func TestFileSourceReadyReportsExpiry(t *testing.T) {
	ca := testpki.New(t, "cluster.local")
	f := writeSVID(t, t.TempDir(), ca, ca.Issue(t, serverID, time.Hour))
	clock := &fakeClock{}
	src, err := NewFileSource(f.cert, f.key, f.bundle, WithClock(clock))
	if err != nil {
		t.Fatal(err)
	}
	if err := src.Ready(); err != nil {
		t.Fatalf("Ready() = %v", err)
	}
	clock.offset.Store(int64(2 * time.Hour))
	if err := src.Ready(); err == nil || !errors.Is(err, ErrNoIdentity) || !strings.Contains(err.Error(), "expired") {
		t.Fatalf("Ready() = %v after expiry, want ErrNoIdentity saying expired", err)
	}
}

func TestFileSourceRefusesAFIFOAndRecovers(t *testing.T) {
	ca := testpki.New(t, "cluster.local")
	f := writeSVID(t, t.TempDir(), ca, ca.Issue(t, "spiffe://cluster.local/ns/a/sa/b", time.Hour))
	s, err := NewFileSource(f.cert, f.key, f.bundle, WithLogger(testLogger(t, nil)))
	if err != nil {
		t.Fatal(err)
	}
	good, err := os.ReadFile(f.cert)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(f.cert); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mkfifo(f.cert, 0o600); err != nil {
		t.Fatalf("mkfifo: %v", err)
	}
	gen := s.Generation()
	// Nobody writes to the FIFO: a reload that opened or read it would never return.
	if err := s.Rotate(context.Background()); !errors.Is(err, fileread.ErrNotRegular) {
		t.Fatalf("reload with a FIFO cert file: err %v, want ErrNotRegular", err)
	}
	if err := s.Ready(); err != nil {
		t.Fatalf("Ready after a refused reload: %v, want the last good identity to serve", err)
	}
	if st := s.Status(); !strings.Contains(st.LastError, f.cert) || s.Generation() != gen {
		t.Fatalf("Status %q, generation %d (was %d): want the FIFO named and the identity kept", st.LastError, s.Generation(), gen)
	}

	if err := os.Remove(f.cert); err != nil {
		t.Fatal(err)
	}
	testpki.WriteFile(t, f.cert, good)
	if _, err := s.reload(false); err != nil {
		t.Fatalf("reload with the file back: %v", err)
	}
	if st := s.Status(); st.LastError != "" {
		t.Fatalf("LastError %q after the same good files came back, want none", st.LastError)
	}
}
