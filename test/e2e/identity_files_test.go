package e2e

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/meshproxy/meshproxy/internal/e2eutil"
	"github.com/meshproxy/meshproxy/internal/testpki"
)

// fileSidecar is a `meshproxy run` serving the identity files in dir.
type fileSidecar struct {
	*process
	side              e2eutil.Sidecar
	cert, key, bundle string
	pki               *testpki.CA
}

func startFileSidecar(t *testing.T) *fileSidecar {
	t.Helper()
	pki := testpki.New(t, "cluster.local")
	dir := t.TempDir()
	cert, key, bundle := pki.WriteSVID(t, dir, pki.Issue(t, serverID, time.Hour))
	a := newSidecarAddrs(t)
	p := start(t, append([]string{"run", "--cert-file", cert, "--key-file", key, "--bundle-file", bundle,
		"--inbound-explicit", freeAddr(t) + "=" + echoApp(t)}, a.flags()...)...)
	a.waitReady(t)
	return &fileSidecar{process: p, side: a.sidecar(), cert: cert, key: key, bundle: bundle, pki: pki}
}

// reloadFailures is the sidecar's count of failed certificate reloads.
func (s *fileSidecar) reloadFailures(t *testing.T) float64 {
	t.Helper()
	v, err := s.side.Metric("meshproxy_config_reloads_total", "kind", "cert", "result", "failure")
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// answering checks that health and /identity answer (the HTTP client
// gives up after 10 s) and that /identity still shows serial.
func (s *fileSidecar) answering(t *testing.T, serial string) {
	t.Helper()
	if err := s.side.Ready(); err != nil {
		t.Fatalf("/healthz/ready: %v", err)
	}
	id, err := s.side.Identity()
	if err != nil {
		t.Fatalf("/identity: %v", err)
	}
	if id.Serial != serial {
		t.Fatalf("/identity serial %s, want the last good %s", id.Serial, serial)
	}
}

// writeNew installs a fresh SVID (new serial) by renaming new files over
// the three paths, and returns its serial as /identity shows it.
func (s *fileSidecar) writeNew(t *testing.T) string {
	t.Helper()
	svid := s.pki.Issue(t, serverID, time.Hour)
	staged := t.TempDir()
	cert, key, bundle := s.pki.WriteSVID(t, staged, svid)
	for from, to := range map[string]string{cert: s.cert, key: s.key, bundle: s.bundle} {
		data, err := os.ReadFile(from)
		if err != nil {
			t.Fatal(err)
		}
		tmp := to + ".tmp"
		if err := os.WriteFile(tmp, data, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, to); err != nil { // replaces a FIFO or a big file too
			t.Fatal(err)
		}
	}
	return fmt.Sprintf("%x", svid.Certificates[0].SerialNumber)
}

// waitSerial waits for /identity to show serial.
func (s *fileSidecar) waitSerial(t *testing.T, what, serial string) {
	t.Helper()
	eventually(t, what, func() error {
		id, err := s.side.Identity()
		if err != nil {
			return err
		}
		if id.Serial != serial {
			return fmt.Errorf("serial %s, want %s", id.Serial, serial)
		}
		return nil
	})
}

func TestFIFOAtAnIdentityFileNeitherHangsHealthNorBlocksReloads(t *testing.T) {
	s := startFileSidecar(t)
	first, err := s.side.Identity()
	if err != nil {
		t.Fatal(err)
	}
	serial := first.Serial
	for _, which := range []string{"cert", "key", "bundle"} {
		path := map[string]string{"cert": s.cert, "key": s.key, "bundle": s.bundle}[which]
		failures := s.reloadFailures(t)
		if err := os.Remove(path); err != nil {
			t.Fatal(err)
		}
		// Nobody ever writes to it: a plain open or read would block for good.
		if err := syscall.Mkfifo(path, 0o600); err != nil {
			t.Fatalf("mkfifo: %v", err)
		}
		eventually(t, "the FIFO at --"+which+"-file refused", func() error {
			if s.reloadFailures(t) <= failures {
				return fmt.Errorf("no failed reload counted yet")
			}
			return nil
		})
		s.answering(t, serial)
		if out := s.Output.String(); !strings.Contains(out, path) || !strings.Contains(out, "not a regular file") {
			t.Fatalf("the log does not say why %s was refused:\n%s", path, out)
		}

		// Valid files written afterwards are loaded.
		serial = s.writeNew(t)
		s.waitSerial(t, "the new files after the FIFO at --"+which+"-file", serial)
	}
}

// vmRSS is the resident set size of process pid in KiB.
func vmRSS(t *testing.T, pid int) int {
	t.Helper()
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
			kb, err := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(rest), " kB"))
			if err != nil {
				t.Fatalf("VmRSS %q: %v", rest, err)
			}
			return kb
		}
	}
	t.Fatalf("no VmRSS in /proc/%d/status", pid)
	return 0
}

func TestHugeCertFileIsRefusedAndTheLastGoodIdentityKept(t *testing.T) {
	s := startFileSidecar(t)
	first, err := s.side.Identity()
	if err != nil {
		t.Fatal(err)
	}
	failures := s.reloadFailures(t)
	// 400 MB, sparse: reading it whole would take 400 MB of memory.
	big := filepath.Join(filepath.Dir(s.cert), "big.tmp")
	f, err := os.Create(big)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(400 << 20); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if err := os.Rename(big, s.cert); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the 400 MB cert file refused", func() error {
		if s.reloadFailures(t) <= failures {
			return fmt.Errorf("no failed reload counted yet")
		}
		return nil
	})
	s.answering(t, first.Serial)
	if out := s.Output.String(); !strings.Contains(out, s.cert) || !strings.Contains(out, "more than the 1048576 allowed") {
		t.Fatalf("the log does not say why the big cert file was refused:\n%s", out)
	}
	// A behavioural bound, not a timing: the file was never read whole.
	if kb := vmRSS(t, s.PID()); kb > 100<<10 {
		t.Fatalf("sidecar RSS %d KiB after the big cert file, want < 100 MiB: it was read", kb)
	}

	s.waitSerial(t, "valid files after the big one", s.writeNew(t))
}
