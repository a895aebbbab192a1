package reliability

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/meshproxy/meshproxy/internal/e2eutil"
	"github.com/meshproxy/meshproxy/internal/testpki"
)

func TestRotationsAndBundleChangeUnderLoadFailNothing(t *testing.T) {
	rotations := 100
	if testing.Short() {
		rotations = 20
	}
	ca := newMeshCA(t)
	ca.serve(t)
	// Both sides read their extra roots from the same bundle file; it starts
	// with the CA's root and gains a second one mid-test (a root rotation).
	rootPEM, err := os.ReadFile(ca.root)
	if err != nil {
		t.Fatal(err)
	}
	bundle := t.TempDir() + "/bundle.pem"
	writeFile(t, bundle, string(rootPEM))
	// Renewals back to back: the admin API's one-a-second pace is lifted.
	p := startPair(t, e2eutil.EchoApp(t), func(id string) []string { return ca.identity(id, "--bundle-file", bundle) }, "--rotate-interval", "1ms")

	var (
		stop           = make(chan struct{})
		wg             sync.WaitGroup
		newConns, kept atomic.Int64
		failures       atomic.Int64
		firstErr       atomic.Value
		fail           = func(err error) { failures.Add(1); firstErr.CompareAndSwap(nil, err.Error()) }
		stopped        = func() bool {
			select {
			case <-stop:
				return true
			default:
				return false
			}
		}
		newConnWorkers  = 4
		keptConnections = 4
	)
	for w := range newConnWorkers {
		wg.Go(func() {
			for i := 0; !stopped(); i++ {
				if err := exchange(p.entry, fmt.Sprintf("new %d-%d", w, i)); err != nil {
					fail(fmt.Errorf("new connection: %w", err))
					continue
				}
				newConns.Add(1)
			}
		})
	}
	for k := range keptConnections {
		c, err := net.DialTimeout("tcp", p.entry, 10*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		r := bufio.NewReader(c)
		wg.Go(func() {
			for i := 0; !stopped(); i++ {
				_ = c.SetDeadline(time.Now().Add(wait))
				if err := echoLine(c, r, fmt.Sprintf("kept %d-%d", k, i)); err != nil {
					fail(fmt.Errorf("kept connection %d: %w", k, err))
					return
				}
				kept.Add(1)
				time.Sleep(5 * time.Millisecond)
			}
		})
	}

	sides := []e2eutil.Sidecar{p.client, p.server}
	serials := map[string]bool{}
	for i := range rotations {
		// Both sides at once: each admin API starts one renewal a second.
		ids := make([]e2eutil.Identity, len(sides))
		errs := make([]error, len(sides))
		var rot sync.WaitGroup
		for k, s := range sides {
			rot.Go(func() { ids[k], errs[k] = s.Rotate() })
		}
		rot.Wait()
		for k := range sides {
			if errs[k] != nil {
				t.Errorf("rotation %d: %v", i, errs[k])
				continue
			}
			serials[ids[k].Serial] = true
		}
		if i == rotations/2 {
			// A root rotation begins: a second root joins the bundle.
			next := testpki.New(t, "cluster.local")
			writeFile(t, bundle, string(rootPEM)+string(testpki.PEMCerts(next.Root)))
			for _, s := range sides {
				e2eutil.Eventually(t, "bundle reloaded on "+s.Admin, wait, func() error {
					id, err := s.Identity()
					if err != nil {
						return err
					}
					if n := strings.Count(id.BundlePEM, "BEGIN CERTIFICATE"); n != 2 {
						return fmt.Errorf("%d roots in the bundle", n)
					}
					return nil
				})
			}
		}
	}
	// Let the load run on the final certificates for a moment, then stop.
	before := newConns.Load()
	e2eutil.Eventually(t, "new connections after the last rotation", wait, func() error {
		if newConns.Load() < before+20 {
			return fmt.Errorf("%d so far", newConns.Load()-before)
		}
		return nil
	})
	close(stop)
	wg.Wait()

	if n := failures.Load(); n > 0 {
		t.Fatalf("%d requests failed during rotations; first: %v", n, firstErr.Load())
	}
	if want := 2 * rotations; len(serials) != want {
		t.Errorf("%d distinct serials after %d rotations on two sidecars, want %d", len(serials), rotations, want)
	}
	for _, s := range sides {
		v, err := s.Metric("meshproxy_cert_rotations_total", "result", "success")
		if err != nil || v < float64(rotations+1) {
			t.Errorf("%s: cert_rotations_total{success} = %v, %v; want at least %d", s.Admin, v, err, rotations+1)
		}
	}
	t.Logf("%d rotations per side and a bundle change under load: %d new connections and %d round trips on %d kept connections, none failed",
		rotations, newConns.Load(), kept.Load(), keptConnections)
	if newConns.Load() < int64(rotations) || kept.Load() < int64(rotations) {
		t.Errorf("too little load ran alongside the rotations to mean anything")
	}
}
