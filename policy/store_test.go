package policy

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.uber.org/goleak"

	"github.com/meshproxy/meshproxy/metrics"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// runStore runs st until the returned stop is called.
func runStore(t *testing.T, st *Store) (stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- st.Run(ctx) }()
	return func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	}
}

func reloads(result string) float64 {
	return testutil.ToFloat64(metrics.ConfigReloads.WithLabelValues("policy", result))
}

func TestHotReloadAppliesNewFiles(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, dir, "mesh.yaml", peerAuth("istio-system", "default", "", "", "STRICT", nil))
	st, err := NewStore(dir, Workload{Namespace: "shop"}, quiet)
	if err != nil {
		t.Fatal(err)
	}
	first := st.Current()
	if first.InboundMode(80) != ModeStrict {
		t.Fatalf("mode = %v", first.InboundMode(80))
	}
	successes := reloads("success")
	stop := runStore(t, st)
	defer stop()

	writeFile(t, dir, "shop.yaml", peerAuth("shop", "default", "", "", "DISABLE", nil))
	waitFor(t, "the namespace policy", func() bool { return st.Current().InboundMode(80) == ModeDisable })
	if got := st.Current().Generation(); got <= first.Generation() {
		t.Errorf("generation %d, want > %d", got, first.Generation())
	}
	if first.InboundMode(80) != ModeStrict {
		t.Error("an old snapshot changed: snapshots must be immutable")
	}
	// The snapshot is published just before the reload is counted.
	waitFor(t, "the successful reload to be counted", func() bool { return reloads("success") > successes })

	if err := os.Remove(filepath.Join(dir, "shop.yaml")); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the removal", func() bool { return st.Current().InboundMode(80) == ModeStrict })
}

func TestBadFileKeepsLastGoodPolicy(t *testing.T) {
	dir := t.TempDir()
	path := writeFile(t, dir, "authz.yaml", "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny-all\n  namespace: shop\nspec:\n  action: DENY\n  rules: [{}]\n")
	st, err := NewStore(dir, Workload{Namespace: "shop"}, quiet, WithStrictConfig(true))
	if err != nil {
		t.Fatal(err)
	}
	good := st.Current()
	failures := reloads("failure")
	stop := runStore(t, st)
	defer stop()

	// A second file is broken: under --strict-config the directory is
	// applied all or nothing, so the good change in the first file must not
	// apply either.
	writeFile(t, dir, "authz.yaml", "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny-all\n  namespace: shop\nspec:\n  action: DENY\n")
	writeFile(t, dir, "broken.yaml", "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: l7\n  namespace: shop\nspec:\n  action: REJECT\n")
	waitFor(t, "the failure to be counted", func() bool { return reloads("failure") > failures })
	if st.Current() != good {
		t.Fatal("snapshot replaced by a bad directory")
	}
	if d := st.Current().Authorize(Request{Port: 80}); d.Allowed {
		t.Errorf("last good policy (deny all) not in force: %+v", d)
	}

	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	writeFile(t, dir, "broken.yaml", "# fixed\n")
	waitFor(t, "the fixed directory", func() bool { return st.Current().Authorize(Request{Port: 80}).Allowed })
}

func TestFailureIsCountedOncePerBadContent(t *testing.T) {
	dir := t.TempDir()
	st, err := NewStore(dir, Workload{Namespace: "shop"}, quiet, WithStrictConfig(true))
	if err != nil {
		t.Fatal(err)
	}
	before := reloads("failure")
	writeFile(t, dir, "bad.yaml", "kind: PeerAuthentication\napiVersion: security.istio.io/v1\nmetadata: {name: x}\nspec: {mtls: {mode: NOPE}}\n")
	ctx := context.Background()
	for range 3 {
		if err := st.reload(ctx); err == nil || !strings.Contains(err.Error(), "bad.yaml") {
			t.Fatalf("reload err = %v", err)
		}
	}
	if got := reloads("failure") - before; got != 1 {
		t.Errorf("failures counted %v times, want 1", got)
	}
	// Back to the last good content, then the same mistake again: counted again.
	if err := os.Remove(filepath.Join(dir, "bad.yaml")); err != nil {
		t.Fatal(err)
	}
	if err := st.reload(ctx); err != nil {
		t.Fatal(err)
	}
	writeFile(t, dir, "bad.yaml", "kind: PeerAuthentication\napiVersion: security.istio.io/v1\nmetadata: {name: x}\nspec: {mtls: {mode: NOPE}}\n")
	if err := st.reload(ctx); err == nil {
		t.Fatal("bad content loaded")
	}
	if got := reloads("failure") - before; got != 2 {
		t.Errorf("failures counted %v times, want 2", got)
	}
	// Unchanged content is not reloaded.
	writeFile(t, dir, "bad.yaml", "")
	if err := st.reload(ctx); err != nil {
		t.Fatal(err)
	}
	gen := st.Current().Generation()
	if err := st.reload(ctx); err != nil || st.Current().Generation() != gen {
		t.Errorf("unchanged dir published generation %d (was %d), err %v", st.Current().Generation(), gen, err)
	}
}

func TestInitialLoadFailureIsCounted(t *testing.T) {
	before := reloads("failure")
	if _, err := loadYAML(t, Workload{Namespace: "shop"}, "a: [\n"); err == nil {
		t.Fatal("bad YAML loaded")
	}
	if reloads("failure") != before+1 {
		t.Error("initial failure not counted")
	}
}

func TestStaticRunReturnsOnCancel(t *testing.T) {
	stop := runStore(t, Static(Workload{}))
	stop()
}

func TestPollingCatchesChangesWithoutEvents(t *testing.T) {
	dir := t.TempDir()
	sub := filepath.Join(dir, "real")
	if err := os.Mkdir(sub, 0o755); err != nil {
		t.Fatal(err)
	}
	writeFile(t, sub, "pa.yaml", peerAuth("shop", "default", "", "", "STRICT", nil))
	// The watched dir holds only a symlink to a file in another directory:
	// writes to the target raise no event in the watched dir.
	link := filepath.Join(dir, "watched")
	if err := os.Mkdir(link, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(filepath.Join(sub, "pa.yaml"), filepath.Join(link, "pa.yaml")); err != nil {
		t.Fatal(err)
	}
	st, err := NewStore(link, Workload{Namespace: "shop"}, quiet, WithPollInterval(20*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	stop := runStore(t, st)
	defer stop()
	writeFile(t, sub, "pa.yaml", peerAuth("shop", "default", "", "", "DISABLE", nil))
	waitFor(t, "the poll to see the change", func() bool { return st.Current().InboundMode(1) == ModeDisable })
}
