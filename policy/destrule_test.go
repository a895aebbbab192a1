package policy

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

func mustAddrPort(s string) netip.AddrPort { return netip.MustParseAddrPort(s) }

// fakeDNS is an in-memory resolver injected with WithResolver.
type fakeDNS struct {
	mu      sync.Mutex
	answers map[string][]netip.Addr
	asked   []string
}

func newFakeDNS(m map[string]string) *fakeDNS {
	f := &fakeDNS{answers: map[string][]netip.Addr{}}
	for name, addrs := range m {
		f.set(name, addrs)
	}
	return f
}

func (f *fakeDNS) set(name string, addrs ...string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var as []netip.Addr
	for _, a := range addrs {
		as = append(as, netip.MustParseAddr(a))
	}
	f.answers[name] = as
}

func (f *fakeDNS) resolve(_ context.Context, host string) ([]netip.Addr, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.asked = append(f.asked, host)
	a, ok := f.answers[host]
	if !ok {
		return nil, fmt.Errorf("lookup %s: no such host", host)
	}
	return slices.Clone(a), nil
}

func destRuleYAML(ns, name, host, body string) string {
	return fmt.Sprintf("apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: %s\n  namespace: %s\nspec:\n  host: %q\n%s", name, ns, host, body)
}

const (
	mutual  = "  trafficPolicy:\n    tls:\n      mode: ISTIO_MUTUAL\n"
	disable = "  trafficPolicy:\n    tls:\n      mode: DISABLE\n"
)

func TestOutboundDestinationRules(t *testing.T) {
	wl := Workload{Namespace: "shop", Labels: map[string]string{"app": "web"}}
	dns := newFakeDNS(map[string]string{
		"payments.prod.svc.cluster.local": "10.1.2.3",
		"cart.shop":                       "10.9.9.9",
	})
	dns.set("dual.example.com", "10.5.5.5", "fd00::5")
	sans := "  trafficPolicy:\n    tls:\n      mode: ISTIO_MUTUAL\n      subjectAltNames:\n      - spiffe://cluster.local/ns/prod/sa/payments\n      - cluster.local/ns/prod/sa/payments-canary\n"
	portLevel := "  trafficPolicy:\n    tls:\n      mode: ISTIO_MUTUAL\n    portLevelSettings:\n    - port:\n        number: 5432\n      tls:\n        mode: DISABLE\n    - port:\n        number: 8443\n"
	onlyPort := "  trafficPolicy:\n    portLevelSettings:\n    - port:\n        number: 9000\n      tls:\n        mode: DISABLE\n"
	all := docs(
		destRuleYAML("istio-system", "pods", "10.0.0.0/8", mutual),
		destRuleYAML("shop", "legacy", "10.20.0.0/16", disable),
		destRuleYAML("shop", "legacy-host", "10.20.30.40", portLevel),
		destRuleYAML("prod", "payments", "payments.prod.svc.cluster.local", sans),
		destRuleYAML("shop", "cart", "cart", mutual),
		destRuleYAML("shop", "dual", "dual.example.com", mutual),
		destRuleYAML("shop", "v6", "fd00:1::/64", disable),
		destRuleYAML("shop", "ports-only", "192.168.1.1", onlyPort),
		destRuleYAML("other", "private", "172.16.0.1", mutual+"  exportTo: [\".\"]\n"),
		destRuleYAML("shop", "for-api", "172.16.0.2", mutual+"  workloadSelector:\n    matchLabels:\n      app: api\n"),
		destRuleYAML("shop", "for-web", "172.16.0.3", mutual+"  workloadSelector:\n    matchLabels:\n      app: web\n"),
	)
	snap := mustLoad(t, wl, all, WithResolver(dns.resolve))
	payments := []spiffeid.ID{
		spiffeid.RequireFromString("spiffe://cluster.local/ns/prod/sa/payments"),
		spiffeid.RequireFromString("spiffe://cluster.local/ns/prod/sa/payments-canary"),
	}
	tests := []struct {
		dst  string
		want Outbound
	}{
		{"10.200.0.1:80", Outbound{Matched: true, MTLS: true}},                // CIDR /8
		{"[::ffff:10.200.0.1]:80", Outbound{Matched: true, MTLS: true}},       // v4-mapped form
		{"10.20.1.1:80", Outbound{Matched: true, MTLS: false}},                // longer prefix wins
		{"10.20.30.40:80", Outbound{Matched: true, MTLS: true}},               // exact IP over CIDR
		{"10.20.30.40:5432", Outbound{Matched: true, MTLS: false}},            // port level over rule level
		{"10.20.30.40:8443", Outbound{Matched: true, MTLS: true}},             // port level without tls inherits
		{"10.1.2.3:443", Outbound{Matched: true, MTLS: true, SANs: payments}}, // resolved name, SANs
		{"10.9.9.9:80", Outbound{Matched: true, MTLS: true}},                  // short name qualified with namespace
		{"10.5.5.5:80", Outbound{Matched: true, MTLS: true}},                  // each resolved address
		{"[fd00::5]:80", Outbound{Matched: true, MTLS: true}},                 //
		{"[fd00:1::7]:80", Outbound{Matched: true, MTLS: false}},              // IPv6 CIDR
		{"192.168.1.1:9000", Outbound{Matched: true, MTLS: false}},            // port-only rule
		{"192.168.1.1:80", Outbound{}},                                        // ... does not cover other ports
		{"172.16.0.1:80", Outbound{}},                                         // exportTo "." in another namespace
		{"172.16.0.2:80", Outbound{}},                                         // workloadSelector for others
		{"172.16.0.3:80", Outbound{Matched: true, MTLS: true}},                // workloadSelector for us
		{"8.8.8.8:53", Outbound{}},                                            // nothing
		{"[2001:db8::1]:443", Outbound{}},                                     //
	}
	for _, tt := range tests {
		got := snap.Outbound(mustAddrPort(tt.dst))
		if got.Matched != tt.want.Matched || got.MTLS != tt.want.MTLS || !slices.Equal(got.SANs, tt.want.SANs) {
			t.Errorf("Outbound(%s) = %+v, want %+v", tt.dst, got, tt.want)
		}
	}
}

func TestOutboundStarHostCoversEverything(t *testing.T) {
	snap := mustLoad(t, Workload{Namespace: "shop"}, docs(
		destRuleYAML("istio-system", "all", "*", mutual),
		destRuleYAML("shop", "ext", "203.0.113.0/24", disable)))
	for dst, mtls := range map[string]bool{"10.0.0.1:80": true, "[2001:db8::1]:80": true, "203.0.113.9:443": false} {
		if got := snap.Outbound(mustAddrPort(dst)); !got.Matched || got.MTLS != mtls {
			t.Errorf("Outbound(%s) = %+v, want mtls=%v", dst, got, mtls)
		}
	}
}

func TestOutboundTieGoesToOwnNamespaceThenOldest(t *testing.T) {
	wl := Workload{Namespace: "shop"}
	snap := mustLoad(t, wl, docs(
		destRuleYAML("istio-system", "root", "10.0.0.1", disable),
		destRuleYAML("prod", "theirs", "10.0.0.1", disable),
		destRuleYAML("shop", "ours", "10.0.0.1", mutual),
		destRuleYAML("istio-system", "root2", "10.0.0.2", mutual),
		destRuleYAML("prod", "theirs2", "10.0.0.2", disable),
		"apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: a-new\n  namespace: shop\n  creationTimestamp: \"2025-02-01T00:00:00Z\"\nspec:\n  host: 10.0.0.3\n"+disable,
		"apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: z-old\n  namespace: shop\n  creationTimestamp: \"2025-01-01T00:00:00Z\"\nspec:\n  host: 10.0.0.3\n"+mutual,
	))
	for dst, mtls := range map[string]bool{"10.0.0.1:80": true, "10.0.0.2:80": false, "10.0.0.3:80": true} {
		if got := snap.Outbound(mustAddrPort(dst)); !got.Matched || got.MTLS != mtls {
			t.Errorf("Outbound(%s) = %+v, want mtls=%v", dst, got, mtls)
		}
	}
}

func TestUnresolvableNameMatchesNothingButLoads(t *testing.T) {
	dns := newFakeDNS(nil)
	snap := mustLoad(t, Workload{Namespace: "shop"}, destRuleYAML("shop", "gone", "gone.example.com", mutual), WithResolver(dns.resolve))
	if got := snap.Outbound(mustAddrPort("10.0.0.1:80")); got.Matched {
		t.Errorf("Outbound = %+v", got)
	}
}

func TestDNSRefreshUpdatesAddresses(t *testing.T) {
	dns := newFakeDNS(map[string]string{"api.example.com": "10.0.0.1"})
	st, err := loadYAML(t, Workload{Namespace: "shop"}, destRuleYAML("shop", "api", "api.example.com", mutual),
		WithResolver(dns.resolve), WithResolveInterval(20*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- st.Run(ctx) }()
	defer func() { cancel(); <-done }()

	gen := st.Current().Generation()
	dns.set("api.example.com", "10.0.0.2")
	waitFor(t, "new address", func() bool { return st.Current().Outbound(mustAddrPort("10.0.0.2:80")).MTLS })
	if st.Current().Outbound(mustAddrPort("10.0.0.1:80")).Matched {
		t.Error("old address still matched")
	}
	if st.Current().Generation() <= gen {
		t.Errorf("generation %d, want > %d", st.Current().Generation(), gen)
	}
	// A failing lookup keeps the last good answer.
	dns.mu.Lock()
	delete(dns.answers, "api.example.com")
	n := len(dns.asked)
	dns.mu.Unlock()
	waitFor(t, "another lookup", func() bool { dns.mu.Lock(); defer dns.mu.Unlock(); return len(dns.asked) > n+1 })
	if !st.Current().Outbound(mustAddrPort("10.0.0.2:80")).MTLS {
		t.Error("address lost after a failed lookup")
	}
}

// waitFor polls cond for up to 30 s (generous for a loaded machine).
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestOutboundNameCarriesThePool: a rule matched by name gives its
// connection pool (port-level first) with or without a TLS setting, and
// MatchesByName tells whether any rule needs a name to match.
func TestOutboundNameCarriesThePool(t *testing.T) {
	snap := mustLoad(t, Workload{Namespace: "shop"}, docs(
		destRuleYAML("shop", "wild", "*.example.com", "  trafficPolicy:\n    connectionPool:\n      tcp: {maxConnections: 3}\n    portLevelSettings:\n    - port: {number: 443}\n      connectionPool:\n        tcp: {maxConnections: 1}\n"),
	))
	if !snap.MatchesByName() {
		t.Error("MatchesByName false with a *.example.com host")
	}
	for port, want := range map[uint16]int{80: 3, 443: 1} {
		o := snap.OutboundName("db.example.com", port)
		if o.Matched || o.Pool == nil || o.Pool.MaxConnections != want {
			t.Errorf("port %d: %+v, want no TLS setting and maxConnections %d", port, o, want)
		}
	}
	if o := snap.OutboundName("db.example.org", 80); o.Pool != nil || o.Matched {
		t.Errorf("another name matched: %+v", o)
	}
	if mustLoad(t, Workload{Namespace: "shop"}, destRuleYAML("shop", "mesh", "*.local", "  trafficPolicy:\n    tls: {mode: ISTIO_MUTUAL}\n")).MatchesByName() {
		t.Error("MatchesByName true for the mesh-wide *.local form, which matches by address")
	}
}
