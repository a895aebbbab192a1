package reliability

import (
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/meshproxy/meshproxy/internal/e2eutil"
)

func TestCADownAtStartRetriesWithExponentialBackoff(t *testing.T) {
	t.Parallel()
	ca := newMeshCA(t) // initialised, not serving yet
	side := e2eutil.NewSidecar(t)
	proc := e2eutil.Start(t, binary, nil, append(append([]string{"run", "--log-format", "json",
		"--inbound-explicit", e2eutil.FreeAddr(t) + "=" + e2eutil.EchoApp(t)}, ca.identity(serverID)...), side.Flags()...)...)

	// Five failed attempts: the first at once, then after backoff.
	const attempts = 5
	var failures []logEntry
	e2eutil.Eventually(t, "five failed attempts to reach the CA", wait, func() error {
		failures = logEntries(proc, "certificate renewal failed")
		if len(failures) < attempts {
			return fmt.Errorf("%d so far", len(failures))
		}
		return nil
	})
	code, body, err := e2eutil.HTTPGet("http://" + side.Health + "/healthz/ready")
	if err != nil || code != http.StatusServiceUnavailable {
		t.Fatalf("readiness while the CA is down: %d %q %v, want 503", code, body, err)
	}

	// The spacing doubles: retry k waits at least half of 0.5s·2^(k-1)
	// (exponential backoff with jitter in [d/2, d]); a fixed retry interval
	// would fail the later bounds. Only lower bounds are checked, so a slow
	// machine cannot fail this.
	const minBackoff = 500 * time.Millisecond
	var gaps []string
	for k := 1; k < attempts; k++ {
		if failures[k].Failures != k+1 {
			t.Fatalf("attempt %d logged failures=%d", k+1, failures[k].Failures)
		}
		gap := failures[k].Time.Sub(failures[k-1].Time)
		low := (minBackoff << (k - 1)) / 2
		gaps = append(gaps, gap.Round(time.Millisecond).String())
		if gap < low-10*time.Millisecond {
			t.Errorf("retry %d came %s after the previous attempt, backoff allows no less than %s", k, gap, low)
		}
	}
	t.Logf("gaps between attempts while the CA was down: %s", strings.Join(gaps, ", "))
	if !strings.Contains(failures[0].Error, ca.addr) {
		t.Errorf("failure log does not name the CA %s: %q", ca.addr, failures[0].Error)
	}

	// The CA comes up: the next retry succeeds and the sidecar is ready.
	ca.serve(t)
	side.WaitReady(t)
	if len(logEntries(proc, "certificate rotated")) == 0 {
		t.Error("ready without a certificate rotated log line")
	}
}

func TestCADownMidLifeKeepsServingThenRenews(t *testing.T) {
	t.Parallel()
	ca := newMeshCA(t)
	caProc := ca.serve(t)
	// 40s certificates: renewal is due 20s after issue, while the CA is down,
	// leaving 20s for backoff retries to reach it once it is back.
	p := startPair(t, e2eutil.EchoApp(t), func(id string) []string { return ca.identity(id, "--cert-ttl", "40s") })
	if err := exchange(p.entry, "before"); err != nil {
		t.Fatal(err)
	}
	sides := map[string]e2eutil.Sidecar{"client": p.client, "server": p.server}
	first := map[string]e2eutil.Identity{}
	for name, s := range sides {
		id, err := s.Identity()
		if err != nil {
			t.Fatal(err)
		}
		first[name] = id
	}

	caProc.Kill(t)
	// Both renewals fail while traffic keeps flowing on the current certificates.
	n := 0
	e2eutil.Eventually(t, "both sidecars fail to renew", wait, func() error {
		n++
		if err := exchange(p.entry, fmt.Sprintf("during outage %d", n)); err != nil {
			t.Fatalf("request failed while the CA was down: %v", err)
		}
		for name, s := range sides {
			if err := s.Ready(); err != nil {
				t.Fatalf("%s sidecar unready while its certificate is valid: %v", name, err)
			}
			f, err := s.Metric("meshproxy_cert_rotations_total", "result", "failure")
			if err != nil {
				return err
			}
			if f < 1 {
				return fmt.Errorf("%s sidecar has not tried to renew yet", name)
			}
		}
		return nil
	})
	t.Logf("%d requests served while the CA was down", n)

	// The CA returns: both renew before their certificates expire.
	ca.serve(t)
	e2eutil.Eventually(t, "both sidecars renewed", wait, func() error {
		for name, s := range sides {
			id, err := s.Identity()
			if err != nil {
				return err
			}
			if id.Serial == first[name].Serial {
				return fmt.Errorf("%s sidecar still on serial %s", name, id.Serial)
			}
			if !id.NotAfter.After(first[name].NotAfter) {
				return fmt.Errorf("%s sidecar's new certificate ends %s, not after %s", name, id.NotAfter, first[name].NotAfter)
			}
		}
		return nil
	})
	if err := exchange(p.entry, "after"); err != nil {
		t.Fatalf("request after the renewal: %v", err)
	}
}
