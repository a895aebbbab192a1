package dnstest

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"slices"
	"testing"
	"time"
)

// TestServerAnswersItsTableAndRecordsNames: Go's resolver pointed at the
// server gets the table's IPv4 and IPv6 addresses, "no such host" for any
// other name, and Asked lists each name once, in order.
func TestServerAnswersItsTableAndRecordsNames(t *testing.T) {
	s := Start(t, map[string][]netip.Addr{
		"Db.Example.Test": {netip.MustParseAddr("192.0.2.7"), netip.MustParseAddr("2001:db8::7")},
	})
	r := &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, network, s.Addr())
	}}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	got, err := r.LookupNetIP(ctx, "ip", "db.example.test")
	if err != nil {
		t.Fatal(err)
	}
	slices.SortFunc(got, netip.Addr.Compare)
	if want := []netip.Addr{netip.MustParseAddr("192.0.2.7"), netip.MustParseAddr("2001:db8::7")}; !slices.Equal(got, want) {
		t.Fatalf("addresses %v, want %v", got, want)
	}
	_, err = r.LookupNetIP(ctx, "ip", "other.example.test")
	var dnsErr *net.DNSError
	if !errors.As(err, &dnsErr) || !dnsErr.IsNotFound {
		t.Fatalf("unknown name: %v, want no such host", err)
	}
	if _, err := r.LookupNetIP(ctx, "ip", "db.example.test"); err != nil {
		t.Fatal(err)
	}
	if asked, want := s.Asked(), []string{"db.example.test", "other.example.test"}; !slices.Equal(asked, want) {
		t.Fatalf("Asked() = %q, want %q", asked, want)
	}
}
