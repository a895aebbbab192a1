package main

import (
	"context"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/meshproxy/meshproxy/internal/dnstest"
)

// TestDNSServerResolvesThroughTheNamedServer: the resolver of --dns-server
// asks that server (and not resolv.conf's) for a name /etc/hosts lacks.
func TestDNSServerResolvesThroughTheNamedServer(t *testing.T) {
	s := dnstest.Start(t, map[string][]netip.Addr{"db.shop.example.test": {netip.MustParseAddr("192.0.2.9")}})
	r, err := dnsResolver(s.Addr())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	got, err := r.LookupNetIP(ctx, "ip", "db.shop.example.test")
	if err != nil || !slices.Equal(got, []netip.Addr{netip.MustParseAddr("192.0.2.9")}) {
		t.Fatalf("lookup: %v %v, want [192.0.2.9]", got, err)
	}
	if asked := s.Asked(); !slices.Equal(asked, []string{"db.shop.example.test"}) {
		t.Fatalf("server asked %q", asked)
	}
	if r, err := dnsResolver(""); r != nil || err != nil {
		t.Fatalf("no flag: %v %v, want the system's resolver (nil)", r, err)
	}
}

// TestDNSServerFlagWantsAnAddress: run and gateway refuse a --dns-server
// that is not IP:PORT (a name would itself need resolving) with a usage
// error naming the flag.
func TestDNSServerFlagWantsAnAddress(t *testing.T) {
	for _, v := range []string{"kube-dns.kube-system:53", "10.96.0.10", "10.96.0.10:0", "[fd00::10]"} {
		for _, args := range [][]string{
			{"run", "--outbound-explicit", "127.0.0.1:0=127.0.0.1:1", "--dns-server", v},
			{"gateway", "--config-dir", t.TempDir(), "--credentials-dir", t.TempDir(), "--dns-server", v},
		} {
			if code, out := caExec(t, args...); code != 2 || !strings.Contains(out, "--dns-server") {
				t.Errorf("%v: exit %d, want 2 naming --dns-server:\n%s", args, code, out)
			}
		}
	}
}
