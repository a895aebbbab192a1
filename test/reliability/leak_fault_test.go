package reliability

import (
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/meshproxy/meshproxy/internal/e2eutil"
	"github.com/meshproxy/meshproxy/internal/testpki"
)

func TestTenThousandConnectionsReturnToBaseline(t *testing.T) {
	total := 10000
	if testing.Short() {
		total = 2000
	}
	const workers = 32
	pki := testpki.New(t, "cluster.local")
	p := startPair(t, e2eutil.EchoApp(t), func(id string) []string { return e2eutil.FileIdentity(t, pki, id) })
	for i := range 50 {
		if err := exchange(p.entry, fmt.Sprintf("warm-up %d", i)); err != nil {
			t.Fatal(err)
		}
	}
	baseClient := backToBaseline(t, "client sidecar before", p.client, p.clientProc, sample(t, p.client, p.clientProc))
	baseServer := backToBaseline(t, "server sidecar before", p.server, p.serverProc, sample(t, p.server, p.serverProc))

	var (
		next, failed atomic.Int64
		firstErr     atomic.Value
		wg           sync.WaitGroup
	)
	start := time.Now()
	for range workers {
		wg.Go(func() {
			for {
				i := next.Add(1)
				if i > int64(total) {
					return
				}
				if err := exchange(p.entry, fmt.Sprintf("connection %d", i)); err != nil {
					failed.Add(1)
					firstErr.CompareAndSwap(nil, fmt.Sprintf("connection %d: %v", i, err))
				}
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	if n := failed.Load(); n > 0 {
		t.Fatalf("%d of %d connections failed; first: %v", n, total, firstErr.Load())
	}
	t.Logf("%d connections through the pair in %s", total, elapsed.Round(time.Millisecond))

	for _, s := range []struct {
		name string
		side e2eutil.Sidecar
		proc *e2eutil.Process
		base resources
	}{{"client sidecar", p.client, p.clientProc, baseClient}, {"server sidecar", p.server, p.serverProc, baseServer}} {
		after := backToBaseline(t, s.name+" after", s.side, s.proc, s.base)
		t.Logf("%s: goroutines %d → %d, descriptors %d → %d", s.name, s.base.goroutines, after.goroutines, s.base.fds, after.fds)
		dir := "outbound"
		if s.name == "server sidecar" {
			dir = "inbound"
		}
		// Any mode: between two meshproxy sidecars connections are pooled
		// (hbone) by default, else direct (mtls).
		ok, err := s.side.Metric("meshproxy_connections_total", "direction", dir, "decision", "allow")
		if err != nil {
			t.Fatal(err)
		}
		if ok < float64(total) {
			t.Errorf("%s counted %v allowed %s connections, want at least %d", s.name, ok, dir, total)
		}
		active, err := s.side.Metric("meshproxy_connections_active", "direction", dir)
		if err != nil || active != 0 {
			t.Errorf("%s connections_active{%s} = %v, %v after all closed", s.name, dir, active, err)
		}
	}
}
