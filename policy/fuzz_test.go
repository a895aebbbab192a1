package policy

import (
	"encoding/json"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// FuzzLoad feeds arbitrary bytes through parsing, validation and every
// Snapshot query. It must never panic, every error must name the file, and
// the same bytes must always give the same snapshot (no map-order
// dependence in precedence). Seeds: testdata/*, testdata/invalid/* and the
// hostile inputs of testdata/fuzz/FuzzLoad (alias bombs, deep nesting, port
// and host edge cases).
func FuzzLoad(f *testing.F) {
	for _, pattern := range []string{"testdata/*.*", "testdata/invalid/*.*"} {
		paths, err := filepath.Glob(pattern)
		if err != nil {
			f.Fatal(err)
		}
		for _, p := range paths {
			data, err := os.ReadFile(p)
			if err != nil {
				f.Fatal(err)
			}
			f.Add(data)
		}
	}
	o := defaultOptions()
	o.log = slog.New(slog.DiscardHandler)
	wl := Workload{Namespace: "prod", Labels: map[string]string{"app": "payments"}}
	peers := []spiffeid.ID{{}, spiffeid.RequireFromString("spiffe://cluster.local/ns/prod/sa/checkout")}
	f.Fuzz(func(t *testing.T, data []byte) {
		cfg := newLoader(wl.Namespace, o.td, o.log).load([]File{{Name: "fuzz.yaml", Data: data}})
		if err := cfg.Err(); err != nil && !strings.HasPrefix(err.Error(), "fuzz.yaml: ") {
			t.Fatalf("error does not name the file: %q", err)
		}
		for _, d := range cfg.Documents {
			if d.File != "fuzz.yaml" || d.Index < 1 || d.Result == "" || (d.Result != ResultApplied && len(d.Messages) == 0) {
				t.Fatalf("document without its place, result or reason: %+v", d)
			}
		}
		resolved := map[string][]netip.Addr{}
		for _, d := range cfg.set.dests {
			if d.name != "" {
				resolved[d.name] = []netip.Addr{netip.MustParseAddr("10.1.2.3"), netip.MustParseAddr("fd00::1")}
			}
		}
		snap := buildSnapshot(1, cfg, wl, &o, resolved)
		for _, port := range []uint16{0, 80, 8080, 65535} {
			if m := snap.InboundMode(port); m == ModeUnset {
				t.Fatalf("InboundMode(%d) is UNSET", port)
			}
			for _, p := range peers {
				if d := snap.Authorize(Request{Peer: p, Port: port}); d.Reason == "" {
					t.Fatalf("Authorize gave no reason: %+v", d)
				}
			}
			snap.Outbound(netip.AddrPortFrom(netip.MustParseAddr("10.1.2.3"), port))
			snap.Outbound(netip.AddrPortFrom(netip.MustParseAddr("fd00::1"), port))
		}
		first, err := json.Marshal(snap)
		if err != nil {
			t.Fatal(err)
		}
		again := newLoader(wl.Namespace, o.td, o.log).load([]File{{Name: "fuzz.yaml", Data: data}})
		second, err := json.Marshal(buildSnapshot(1, again, wl, &o, resolved))
		if err != nil {
			t.Fatal(err)
		}
		if string(first) != string(second) {
			t.Fatalf("the same bytes gave two snapshots:\n%s\n%s", first, second)
		}
	})
}
