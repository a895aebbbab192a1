package rootrotation

import (
	"bytes"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/meshproxy/meshproxy/ca"
	"github.com/meshproxy/meshproxy/internal/e2eutil"
	"github.com/meshproxy/meshproxy/proxy/admin"
	"github.com/meshproxy/meshproxy/tlsmgr"
)

// bin is the meshproxy binary built once for the package.
var bin string

func TestMain(m *testing.M) { e2eutil.Main(m, "rootrotation", &bin) }

const (
	clientID = "spiffe://cluster.local/ns/demo/sa/client"
	serverID = "spiffe://cluster.local/ns/demo/sa/server"
	// certTTL is short so that certificates under the old root expire
	// within the test; sidecars renew at half of it.
	certTTL = "20s"
)

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
}

// traffic keeps connections going through a sidecar pair: workers that
// open a new connection per exchange, and kept connections that exchange a
// message every 100 ms for the whole test. Every failure is recorded.
type traffic struct {
	addr   string
	stop   chan struct{}
	wg     sync.WaitGroup
	ok     atomic.Int64
	failed atomic.Int64
	mu     sync.Mutex
	errs   []string
}

// Bounds of the traffic, so no loop can run away.
const (
	newConnWorkers = 2
	keptConns      = 3
	maxExchanges   = 20000 // per worker
)

func startTraffic(t *testing.T, addr string) *traffic {
	tr := &traffic{addr: addr, stop: make(chan struct{})}
	for w := range newConnWorkers {
		tr.wg.Go(func() { tr.newConnections(w) })
	}
	for k := range keptConns {
		tr.wg.Go(func() { tr.keptConnection(k) })
	}
	t.Cleanup(tr.halt)
	return tr
}

func (tr *traffic) halt() {
	select {
	case <-tr.stop:
	default:
		close(tr.stop)
	}
	tr.wg.Wait()
}

func (tr *traffic) record(err error) {
	if err == nil {
		tr.ok.Add(1)
		return
	}
	tr.failed.Add(1)
	tr.mu.Lock()
	if len(tr.errs) < 20 {
		tr.errs = append(tr.errs, time.Now().Format("15:04:05.000")+" "+err.Error())
	}
	tr.mu.Unlock()
}

func (tr *traffic) stopped(pause time.Duration) bool {
	select {
	case <-tr.stop:
		return true
	case <-time.After(pause):
		return false
	}
}

func (tr *traffic) newConnections(w int) {
	for i := range maxExchanges {
		msg := fmt.Sprintf("new %d/%d\n", w, i)
		tr.record(exchangeOnce(tr.addr, msg))
		if tr.stopped(30 * time.Millisecond) {
			return
		}
	}
}

func exchangeOnce(addr, msg string) error {
	c, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		return fmt.Errorf("new connection: %w", err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(20 * time.Second))
	if _, err := io.WriteString(c, msg); err != nil {
		return fmt.Errorf("new connection: write: %w", err)
	}
	_ = c.(*net.TCPConn).CloseWrite()
	got, err := io.ReadAll(c)
	if err != nil {
		return fmt.Errorf("new connection: read: %w", err)
	}
	if string(got) != msg {
		return fmt.Errorf("new connection: got %q, want %q", got, msg)
	}
	return nil
}

func (tr *traffic) keptConnection(k int) {
	c, err := net.DialTimeout("tcp", tr.addr, 10*time.Second)
	if err != nil {
		tr.record(fmt.Errorf("kept connection %d: dial: %w", k, err))
		return
	}
	defer c.Close()
	buf := make([]byte, 64)
	for i := range maxExchanges {
		msg := fmt.Sprintf("kept %d/%d\n", k, i)
		_ = c.SetDeadline(time.Now().Add(20 * time.Second))
		_, err := io.WriteString(c, msg)
		if err == nil {
			_, err = io.ReadFull(c, buf[:len(msg)])
		}
		if err == nil && string(buf[:len(msg)]) != msg {
			err = fmt.Errorf("got %q, want %q", buf[:len(msg)], msg)
		}
		if err != nil {
			tr.record(fmt.Errorf("kept connection %d, exchange %d: %w", k, i, err))
			return // the connection is broken: one failure is enough
		}
		tr.record(nil)
		if tr.stopped(100 * time.Millisecond) {
			return
		}
	}
}

func (tr *traffic) report() string {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	return fmt.Sprintf("%d exchanges ok, %d failed: %s", tr.ok.Load(), tr.failed.Load(), strings.Join(tr.errs, "; "))
}

// progresses waits until more exchanges succeed, so each phase is seen
// carrying traffic.
func (tr *traffic) progresses(t *testing.T, phase string) {
	t.Helper()
	from := tr.ok.Load()
	e2eutil.Eventually(t, "traffic flows "+phase, 30*time.Second, func() error {
		if tr.ok.Load() < from+20 {
			return errors.New("stalled: " + tr.report())
		}
		return nil
	})
}

// state is what a sidecar holds: its chain and its trusted roots.
type state struct {
	chain, roots []*x509.Certificate
}

func stateOf(s e2eutil.Sidecar) (state, error) {
	code, body, err := e2eutil.HTTPGet("http://" + s.Admin + "/identity")
	if err != nil {
		return state{}, err
	}
	if code != http.StatusOK {
		return state{}, fmt.Errorf("/identity: %d", code)
	}
	var id admin.Identity
	if err := json.Unmarshal([]byte(body), &id); err != nil {
		return state{}, err
	}
	var st state
	if st.chain, err = tlsmgr.ParseCertificatesPEM([]byte(id.ChainPEM)); err != nil {
		return state{}, err
	}
	if st.roots, err = tlsmgr.ParseCertificatesPEM([]byte(id.BundlePEM)); err != nil {
		return state{}, err
	}
	return st, nil
}

// chainsTo reports whether the chain (leaf first) verifies to root alone.
func (st state) chainsTo(root *x509.Certificate) bool {
	roots, inter := x509.NewCertPool(), x509.NewCertPool()
	roots.AddCert(root)
	for _, c := range st.chain[1:] {
		inter.AddCert(c)
	}
	_, err := st.chain[0].Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
	return err == nil
}

func (st state) trusts(roots ...*x509.Certificate) bool {
	if len(st.roots) != len(roots) {
		return false
	}
	for _, r := range roots {
		found := false
		for _, h := range st.roots {
			found = found || bytes.Equal(h.Raw, r.Raw)
		}
		if !found {
			return false
		}
	}
	return true
}

// both waits until cond holds for both sidecars.
func both(t *testing.T, what string, within time.Duration, sides []e2eutil.Sidecar, cond func(state) error) {
	t.Helper()
	e2eutil.Eventually(t, what, within, func() error {
		for i, s := range sides {
			st, err := stateOf(s)
			if err != nil {
				return err
			}
			if err := cond(st); err != nil {
				return fmt.Errorf("sidecar %d: %w", i, err)
			}
		}
		return nil
	})
}

func readRoots(t *testing.T, dir string) []*x509.Certificate {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(dir, ca.RootCertFile))
	if err != nil {
		t.Fatal(err)
	}
	roots, err := tlsmgr.ParseCertificatesPEM(data)
	if err != nil {
		t.Fatal(err)
	}
	return roots
}

func rotateRoot(t *testing.T, dir string, args ...string) e2eutil.Result {
	t.Helper()
	return e2eutil.Run(t, bin, nil, append([]string{"ca", "rotate-root", "--dir", dir}, args...)...)
}

func caStatus(t *testing.T, dir string) ca.RotationStatus {
	t.Helper()
	r := e2eutil.Run(t, bin, nil, "ca", "status", "--dir", dir, "-o", "json")
	if r.Code != 0 {
		t.Fatalf("ca status: %d %s", r.Code, r.Stderr)
	}
	var st ca.RotationStatus
	if err := json.Unmarshal([]byte(r.Stdout), &st); err != nil {
		t.Fatalf("ca status -o json: %v\n%s", err, r.Stdout)
	}
	return st
}

func TestRootRotationWithoutFailedConnections(t *testing.T) {
	base := t.TempDir()
	caDir := filepath.Join(base, "ca")
	if r := e2eutil.Run(t, bin, nil, "ca", "init", "--dir", caDir, "--trust-domain", "cluster.local"); r.Code != 0 {
		t.Fatalf("ca init: %d %s", r.Code, r.Stderr)
	}
	tokens := filepath.Join(base, "tokens")
	writeFile(t, tokens, "tok-client "+clientID+"\ntok-server "+serverID+"\n")
	writeFile(t, filepath.Join(base, "client.token"), "tok-client\n")
	writeFile(t, filepath.Join(base, "server.token"), "tok-server\n")
	caAddr := e2eutil.FreeAddr(t)
	e2eutil.Start(t, bin, nil, "ca", "serve", "--dir", caDir, "--listen", caAddr, "--auth", "token", "--tokens", tokens, "--metrics", e2eutil.FreeAddr(t))

	// The sidecars trust the CA by its directory's root-cert.pem, as pods
	// mount the CA's published roots.
	caRoot := filepath.Join(caDir, ca.RootCertFile)
	app := e2eutil.EchoApp(t)
	inB, outA := e2eutil.FreeAddr(t), e2eutil.FreeAddr(t)
	server, client := e2eutil.NewSidecar(t), e2eutil.NewSidecar(t)
	e2eutil.Start(t, bin, nil, append([]string{"run", "--ca-addr", caAddr, "--ca-root", caRoot,
		"--token-file", filepath.Join(base, "server.token"), "--cert-ttl", certTTL,
		"--inbound-explicit", inB + "=" + app, "--mode", "STRICT"}, server.Flags()...)...)
	e2eutil.Start(t, bin, nil, append([]string{"run", "--ca-addr", caAddr, "--ca-root", caRoot,
		"--token-file", filepath.Join(base, "client.token"), "--cert-ttl", certTTL,
		"--outbound-explicit", outA + "=" + inB + "#" + serverID}, client.Flags()...)...)
	server.WaitReady(t)
	client.WaitReady(t)
	sides := []e2eutil.Sidecar{server, client}
	oldRoot := readRoots(t, caDir)[0]

	start := time.Now()
	tr := startTraffic(t, outA)
	phase := func(what string) { t.Logf("%5.1fs %s (%s)", time.Since(start).Seconds(), what, tr.report()) }
	tr.progresses(t, "before the rotation")
	phase("traffic flowing")

	// add: both sidecars come to trust both roots (they watch --ca-root and
	// renew); certificates still chain to the old root.
	if r := rotateRoot(t, caDir); r.Code != 0 || !strings.Contains(r.Stdout, "added a new root") {
		t.Fatalf("rotate-root (add): %d %s %s", r.Code, r.Stdout, r.Stderr)
	}
	newRoot := readRoots(t, caDir)[1]
	both(t, "both sidecars trust both roots", 60*time.Second, sides, func(st state) error {
		if !st.trusts(oldRoot, newRoot) {
			return fmt.Errorf("trusts %d roots", len(st.roots))
		}
		return nil
	})
	tr.progresses(t, "after add")
	phase("add done: both sidecars trust both roots")

	// switch: certificates move to the new root at the next renewals.
	if r := rotateRoot(t, caDir, "--phase", "switch"); r.Code != 0 || !strings.Contains(r.Stdout, "switched") {
		t.Fatalf("rotate-root --phase switch: %d %s %s", r.Code, r.Stdout, r.Stderr)
	}
	// Retiring now is refused while a certificate under the old root lives.
	if st := caStatus(t, caDir); st.Outstanding != nil && st.Outstanding.Live > 0 && time.Until(st.Outstanding.Until) > 3*time.Second {
		r := rotateRoot(t, caDir, "--phase", "retire")
		if r.Code != 1 || !strings.Contains(r.Stderr, "live until") || !strings.Contains(r.Stderr, "--force") {
			t.Fatalf("early retire: exit %d, stderr %q; want a refusal saying until when and how to force", r.Code, r.Stderr)
		}
	} else {
		t.Logf("early retire not tried: outstanding %+v", st.Outstanding)
	}
	both(t, "both sidecars hold certificates under the new root", 60*time.Second, sides, func(st state) error {
		if !st.chainsTo(newRoot) {
			return errors.New("certificate not under the new root yet")
		}
		return nil
	})
	tr.progresses(t, "after switch")
	phase("switch done: both sidecars hold certificates under the new root")

	// The old root's certificates expire; then it can be retired.
	e2eutil.Eventually(t, "no certificate under the old root is live", 60*time.Second, func() error {
		st := caStatus(t, caDir)
		if st.Outstanding == nil || !st.Outstanding.Recorded || st.Outstanding.Live > 0 {
			return fmt.Errorf("outstanding: %+v", st.Outstanding)
		}
		return nil
	})
	phase("old root's certificates expired")
	if r := rotateRoot(t, caDir); r.Code != 0 || !strings.Contains(r.Stdout, "retired") {
		t.Fatalf("rotate-root (retire): %d %s %s", r.Code, r.Stdout, r.Stderr)
	}
	both(t, "both sidecars trust and chain to the new root only", 60*time.Second, sides, func(st state) error {
		if !st.trusts(newRoot) {
			return fmt.Errorf("trusts %d roots, want only the new one", len(st.roots))
		}
		if !st.chainsTo(newRoot) || st.chainsTo(oldRoot) {
			return errors.New("certificate does not chain to the new root only")
		}
		return nil
	})
	tr.progresses(t, "after retire")
	phase("retire done: both sidecars trust the new root only")

	tr.halt()
	if tr.failed.Load() != 0 {
		t.Fatalf("connections failed during the rotation: %s", tr.report())
	}
	if st := caStatus(t, caDir); st.Phase != ca.PhaseIdle || len(st.Roots) != 1 {
		t.Fatalf("after the rotation: phase %s with %d roots", st.Phase, len(st.Roots))
	}
	t.Logf("rotation done: %s", tr.report())
}
