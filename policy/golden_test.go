package policy

import (
	"net/netip"
	"path/filepath"
	"testing"

	"github.com/meshproxy/meshproxy/internal/istiogolden"
)

// TestIstioTCPGolden checks Istio's TCP semantics on Istio's own inputs
// (testdata/istio/golden-tcp.json) at the policy level; test/e2e checks the
// same cases through real sidecars.
func TestIstioTCPGolden(t *testing.T) {
	cases, err := istiogolden.Load(filepath.Join("..", "testdata", "istio"))
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range cases {
		t.Run(c.Name, func(t *testing.T) {
			wl := Workload{Namespace: c.Namespace, Labels: c.Labels}
			cfg := Load([]File{{Name: c.Input, Data: c.YAML}}, wl, quiet)
			if got := string(cfg.Documents[0].Result); got != c.Result {
				t.Errorf("result %s, want %s: %+v", got, c.Result, cfg.Documents[0].Messages)
			}
			snap := NewSnapshot(cfg, wl, quiet)
			for _, k := range c.Connections {
				r := Request{Peer: id(t, k.Peer), Port: k.Port, Source: netip.MustParseAddr(k.SourceIP()), Dest: netip.MustParseAddr("127.0.0.1")}
				if d := snap.Authorize(r); d.Allowed != k.Allowed {
					t.Errorf("%+v: %+v, Istio: allowed=%v", k, d, k.Allowed)
				}
			}
		})
	}
}
