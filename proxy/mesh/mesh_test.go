package mesh_test

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"runtime"
	"runtime/debug"
	"sync"
	"testing"
	"time"

	"github.com/meshproxy/meshproxy/internal/testpki"
	"github.com/meshproxy/meshproxy/metrics"
	"github.com/meshproxy/meshproxy/proxy/mesh"
	"github.com/meshproxy/meshproxy/tlsmgr"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

const (
	clientID = "spiffe://cluster.local/ns/shop/sa/web"
	serverID = "spiffe://cluster.local/ns/shop/sa/db"
	otherID  = "spiffe://cluster.local/ns/shop/sa/cache"
	wait     = 10 * time.Second // bounds every blocking step; never reached when the test passes
)

// serveMesh accepts one connection on loopback and terminates mesh mTLS on
// it with src's identity; it returns the address and the server's verdict.
func serveMesh(t *testing.T, src tlsmgr.Source) (string, <-chan error) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	verdict := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			verdict <- err
			return
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(wait))
		sc := tls.Server(c, mesh.ServerConfig(src, nil))
		err = sc.Handshake()
		if err == nil {
			// TLS 1.3 clients finish first; read so the client's cert is checked.
			if _, err = sc.Read(make([]byte, 1)); errors.Is(err, io.EOF) {
				err = nil
			}
		}
		verdict <- err
	}()
	return ln.Addr().String(), verdict
}

func mustID(t *testing.T, s string) spiffeid.ID {
	t.Helper()
	id, err := spiffeid.FromString(s)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

func handshakes(result string) float64 {
	return testutil.ToFloat64(metrics.Handshakes.WithLabelValues(mesh.DirOutbound, result))
}

func TestOriginateReturnsTheVerifiedServer(t *testing.T) {
	ca := testpki.New(t, "cluster.local")
	client := tlsmgr.NewStatic(ca.Issue(t, clientID, time.Hour), ca.Bundle())
	addr, verdict := serveMesh(t, tlsmgr.NewStatic(ca.Issue(t, serverID, time.Hour), ca.Bundle()))
	up, err := net.DialTimeout("tcp", addr, wait)
	if err != nil {
		t.Fatal(err)
	}
	defer up.Close()
	before := handshakes(mesh.ResultOK)

	cfgs := mesh.NewClientConfigs(client)
	tc, peer, err := mesh.Originate(context.Background(), up, cfgs.Get("", []spiffeid.ID{mustID(t, serverID)}, spiffeid.TrustDomain{}), wait)
	if err != nil {
		t.Fatalf("Originate: %v", err)
	}
	if peer != mustID(t, serverID) {
		t.Errorf("peer = %s, want %s", peer, serverID)
	}
	if got := tc.ConnectionState().NegotiatedProtocol; got != tlsmgr.ALPNIstio {
		t.Errorf("ALPN = %q, want %q", got, tlsmgr.ALPNIstio)
	}
	_ = tc.CloseWrite()
	if err := <-verdict; err != nil {
		t.Errorf("server refused the originated client: %v", err)
	}
	if got := handshakes(mesh.ResultOK) - before; got != 1 {
		t.Errorf("handshakes_total{outbound,ok} grew by %v, want 1", got)
	}
}

func TestOriginateRefusesAServerWithAnotherIdentity(t *testing.T) {
	ca := testpki.New(t, "cluster.local")
	other := testpki.New(t, "example.org")
	client := tlsmgr.NewStatic(ca.Issue(t, clientID, time.Hour), ca.Bundle(), other.Bundle())
	server := tlsmgr.NewStatic(ca.Issue(t, serverID, time.Hour), ca.Bundle())
	foreign := tlsmgr.NewStatic(other.Issue(t, "spiffe://example.org/ns/shop/sa/db", time.Hour), other.Bundle(), ca.Bundle())
	tests := []struct {
		name   string
		server tlsmgr.Source
		ids    []spiffeid.ID
		want   string
		is     error
	}{
		{"not the expected id", server, []spiffeid.ID{mustID(t, otherID)}, mesh.ResultWrongIdentity, mesh.ErrWrongIdentity},
		{"outside the trust domain", foreign, nil, mesh.ResultWrongTrustDomain, mesh.ErrWrongTrustDomain},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			addr, verdict := serveMesh(t, tt.server)
			up, err := net.DialTimeout("tcp", addr, wait)
			if err != nil {
				t.Fatal(err)
			}
			defer up.Close()
			before := handshakes(tt.want)
			cfg := mesh.NewClientConfigs(client).Get("", tt.ids, spiffeid.RequireTrustDomainFromString("cluster.local"))
			_, _, err = mesh.Originate(context.Background(), up, cfg, wait)
			var he *mesh.HandshakeError
			if !errors.As(err, &he) || he.Result != tt.want || !errors.Is(err, tt.is) {
				t.Fatalf("Originate error = %v, want a HandshakeError %q wrapping %v", err, tt.want, tt.is)
			}
			up.Close()
			<-verdict
			if got := handshakes(tt.want) - before; got != 1 {
				t.Errorf("handshakes_total{outbound,%s} grew by %v, want 1", tt.want, got)
			}
		})
	}
}

func TestClientConfigsBuildsEachDestinationOnce(t *testing.T) {
	ca := testpki.New(t, "cluster.local")
	cfgs := mesh.NewClientConfigs(tlsmgr.NewStatic(ca.Issue(t, clientID, time.Hour), ca.Bundle()))
	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	ids := []spiffeid.ID{mustID(t, serverID)}
	a := cfgs.Get("outbound_.80_._.db.shop", ids, td)
	if b := cfgs.Get("outbound_.80_._.db.shop", ids, td); a != b {
		t.Error("the same destination built a second config")
	}
	if a.ServerName != "outbound_.80_._.db.shop" {
		t.Errorf("ServerName = %q", a.ServerName)
	}
	if c := cfgs.Get("outbound_.80_._.db.shop", nil, td); c == a {
		t.Error("a config expecting any member of the trust domain is shared with one expecting an id")
	}
}

func TestTrustDomain(t *testing.T) {
	ca := testpki.New(t, "cluster.local")
	withSVID := tlsmgr.NewStatic(ca.Issue(t, clientID, time.Hour), ca.Bundle())
	configured := spiffeid.RequireTrustDomainFromString("example.org")
	if td, err := mesh.TrustDomain(configured, withSVID); err != nil || td != configured {
		t.Errorf("configured: got %v, %v; want %s", td, err, configured)
	}
	if td, err := mesh.TrustDomain(spiffeid.TrustDomain{}, withSVID); err != nil || td.String() != "cluster.local" {
		t.Errorf("from the SVID: got %v, %v; want cluster.local", td, err)
	}
	if _, err := mesh.TrustDomain(spiffeid.TrustDomain{}, noSVID{}); !errors.Is(err, tlsmgr.ErrNoIdentity) {
		t.Errorf("without an SVID: err = %v, want ErrNoIdentity", err)
	}
}

// noSVID is a source before its first SVID, as a Rotator is while the CA
// is unreachable at start.
type noSVID struct{}

func (noSVID) GetX509SVID() (*x509svid.SVID, error) { return nil, tlsmgr.ErrNoIdentity }

func TestAddrPortUnmapsIPv4(t *testing.T) {
	want := netip.MustParseAddrPort("10.0.0.1:8080")
	mapped := netip.MustParseAddrPort("[::ffff:10.0.0.1]:8080")
	for _, a := range []net.Addr{net.TCPAddrFromAddrPort(mapped), &net.UDPAddr{IP: mapped.Addr().AsSlice(), Port: 8080}} {
		if got := mesh.AddrPort(a); got != want {
			t.Errorf("AddrPort(%v) = %v, want %v", a, got, want)
		}
	}
	if got := mesh.AddrPort(net.TCPAddrFromAddrPort(netip.MustParseAddrPort("[2001:db8::1]:443"))); got.String() != "[2001:db8::1]:443" {
		t.Errorf("IPv6 address changed: %v", got)
	}
}

// dataplaneOptions stands for a data plane's options struct.
type dataplaneOptions struct {
	mesh.Settings
	own string
}

func TestOptionsKeepDefaultsForUnsetValues(t *testing.T) {
	o := &dataplaneOptions{Settings: mesh.DefaultSettings()}
	for _, opt := range []mesh.Option[*dataplaneOptions]{
		mesh.WithLogger[*dataplaneOptions](nil),
		mesh.WithDialer[*dataplaneOptions](nil),
		mesh.WithDetectTimeout[*dataplaneOptions](0),
		mesh.WithHandshakeTimeout[*dataplaneOptions](-time.Second),
		mesh.WithIdleTimeout[*dataplaneOptions](0),
		mesh.WithMaxConnections[*dataplaneOptions](-1),
	} {
		opt(o)
	}
	if o.Log == nil || o.Dialer == nil || o.DetectTimeout != mesh.DefaultDetectTimeout ||
		o.HandshakeTimeout != mesh.DefaultHandshakeTimeout || o.IdleTimeout != mesh.DefaultIdleTimeout || o.MaxConns != 0 {
		t.Errorf("unset values changed the defaults: %+v", o.Settings)
	}

	l := slog.New(slog.DiscardHandler)
	td := spiffeid.RequireTrustDomainFromString("example.org")
	for _, opt := range []mesh.Option[*dataplaneOptions]{
		mesh.WithLogger[*dataplaneOptions](l),
		mesh.WithTrustDomain[*dataplaneOptions](td),
		mesh.WithDetectTimeout[*dataplaneOptions](time.Second),
		mesh.WithHandshakeTimeout[*dataplaneOptions](2 * time.Second),
		mesh.WithIdleTimeout[*dataplaneOptions](3 * time.Second),
		mesh.WithMaxConnections[*dataplaneOptions](7),
		func(o *dataplaneOptions) { o.own = "set" },
	} {
		opt(o)
	}
	if o.Log != l || o.TrustDomain != td || o.DetectTimeout != time.Second || o.HandshakeTimeout != 2*time.Second ||
		o.IdleTimeout != 3*time.Second || o.MaxConns != 7 || o.own != "set" {
		t.Errorf("options not applied: %+v own=%q", o.Settings, o.own)
	}
}

// TestHandshakeLeavesTheCallerAShallowStack: a connection's goroutine that
// ran its handshake through mesh.Handshake parks (as an idle connection's
// copy loop does) with a fraction of the stack of one that ran the
// handshake itself: ML-KEM and certificate verification grow a stack to
// 16-32 KB, which the goroutine would keep for as long as it idles.
func TestHandshakeLeavesTheCallerAShallowStack(t *testing.T) {
	ca := testpki.New(t, "cluster.local")
	serverCfg := mesh.ServerConfig(tlsmgr.NewStatic(ca.Issue(t, serverID, time.Hour), ca.Bundle()), nil)
	clientCfg := mesh.NewClientConfigs(tlsmgr.NewStatic(ca.Issue(t, clientID, time.Hour), ca.Bundle())).
		Get("", []spiffeid.ID{mustID(t, serverID)}, spiffeid.TrustDomain{})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	// A collection would shrink the parked stacks being compared.
	defer debug.SetGCPercent(debug.SetGCPercent(-1))

	// parked runs n handshakes one after another, each side on a goroutine
	// that then parks, and returns the stack they hold per goroutine.
	parked := func(offload bool) uint64 {
		const n = 32
		release := make(chan struct{})
		var wg sync.WaitGroup
		defer func() { close(release); wg.Wait() }()
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		for range n {
			// TCP, not net.Pipe: the server's session tickets must not
			// wait for a client that is parked.
			b, err := net.Dial("tcp", ln.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			a, err := ln.Accept()
			if err != nil {
				t.Fatal(err)
			}
			errs := make(chan error, 2)
			for _, tc := range []*tls.Conn{tls.Server(a, serverCfg), tls.Client(b, clientCfg)} {
				wg.Add(1)
				go func() {
					defer wg.Done()
					defer tc.Close()
					ctx, cancel := context.WithTimeout(context.Background(), wait)
					defer cancel()
					if offload {
						errs <- mesh.Handshake(ctx, tc)
					} else {
						errs <- tc.HandshakeContext(ctx)
					}
					<-release
				}()
			}
			for range 2 {
				if err := <-errs; err != nil {
					t.Fatalf("handshake: %v", err)
				}
			}
		}
		runtime.ReadMemStats(&after)
		return (after.StackInuse - before.StackInuse) / (2 * n)
	}
	own, aside := parked(false), parked(true)
	t.Logf("stack per parked goroutine: %d bytes after its own handshake, %d after mesh.Handshake", own, aside)
	if aside*2 > own {
		t.Fatalf("a goroutine that handshook through mesh.Handshake holds %d bytes of stack, one that handshook itself %d: want under half",
			aside, own)
	}
}
