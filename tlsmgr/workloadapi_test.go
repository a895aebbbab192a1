package tlsmgr

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/meshproxy/meshproxy/internal/testpki"
	"github.com/meshproxy/meshproxy/metrics"
)

// These tests run the source against a small Workload API server that
// speaks the real protocol (go-spiffe's generated gRPC service on a unix
// socket), so they can push updates, refuse callers and go away on demand.
// test/spireint runs the same source against a real SPIRE agent.

const (
	wapiClientID    = "spiffe://example.org/ns/demo/sa/client"
	wapiServerID    = "spiffe://example.org/ns/demo/sa/server"
	wapiFederatedID = "spiffe://partner.test/ns/shop/sa/checkout"
)

// wapiAgent is a Workload API server holding one X.509 context that tests
// replace with push; every open FetchX509SVID stream receives each push.
type wapiAgent struct {
	workload.UnimplementedSpiffeWorkloadAPIServer
	t    *testing.T
	sock string

	mu      sync.Mutex
	resp    *workload.X509SVIDResponse // nil: refuse, as SPIRE does for an unknown workload
	changed chan struct{}              // closed and replaced on every push
	srv     *grpc.Server
	wg      sync.WaitGroup
}

func newWAPIAgent(t *testing.T) *wapiAgent {
	t.Helper()
	a := &wapiAgent{t: t, sock: filepath.Join(wapiShortDir(t), "agent.sock"), changed: make(chan struct{})}
	a.start()
	t.Cleanup(a.stop)
	return a
}

// wapiShortDir is a temporary directory with a short path: unix socket
// paths are limited to ~107 bytes and t.TempDir() can be longer.
func wapiShortDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "wapi")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

func (a *wapiAgent) addr() string { return "unix://" + a.sock }

// start serves on the socket (again, after stop).
func (a *wapiAgent) start() {
	a.t.Helper()
	_ = os.Remove(a.sock)
	ln, err := net.Listen("unix", a.sock)
	if err != nil {
		a.t.Fatal(err)
	}
	srv := grpc.NewServer()
	workload.RegisterSpiffeWorkloadAPIServer(srv, a)
	a.mu.Lock()
	a.srv = srv
	a.mu.Unlock()
	a.wg.Add(1)
	go func() {
		defer a.wg.Done()
		_ = srv.Serve(ln)
	}()
}

// stop drops every connection and the socket, like a crashed agent.
func (a *wapiAgent) stop() {
	a.mu.Lock()
	srv := a.srv
	a.srv = nil
	a.mu.Unlock()
	if srv != nil {
		srv.Stop()
		a.wg.Wait()
	}
}

// push replaces the context every client sees; nil makes the agent refuse.
func (a *wapiAgent) push(resp *workload.X509SVIDResponse) {
	a.mu.Lock()
	a.resp = resp
	close(a.changed)
	a.changed = make(chan struct{})
	a.mu.Unlock()
}

// FetchX509SVID implements the Workload API stream.
func (a *wapiAgent) FetchX509SVID(_ *workload.X509SVIDRequest, stream grpc.ServerStreamingServer[workload.X509SVIDResponse]) error {
	md, _ := metadata.FromIncomingContext(stream.Context())
	if v := md.Get("workload.spiffe.io"); len(v) != 1 || v[0] != "true" {
		return status.Error(codes.InvalidArgument, "security header missing from request")
	}
	for {
		a.mu.Lock()
		resp, changed := a.resp, a.changed
		a.mu.Unlock()
		if resp == nil {
			return status.Error(codes.PermissionDenied, "no identity issued")
		}
		if err := stream.Send(resp); err != nil {
			return err
		}
		select {
		case <-changed:
		case <-stream.Context().Done():
			return nil
		}
	}
}

// wapiSVID is one SVID of a response, with the roots of its trust domain.
type wapiSVID struct {
	svid  *x509svid.SVID
	roots []*x509.Certificate
}

func wapiResponse(t *testing.T, federated map[string][]*x509.Certificate, svids ...wapiSVID) *workload.X509SVIDResponse {
	t.Helper()
	resp := &workload.X509SVIDResponse{FederatedBundles: map[string][]byte{}}
	for _, s := range svids {
		certs, key, err := s.svid.MarshalRaw()
		if err != nil {
			t.Fatal(err)
		}
		resp.Svids = append(resp.Svids, &workload.X509SVID{
			SpiffeId:    s.svid.ID.String(),
			X509Svid:    certs,
			X509SvidKey: key,
			Bundle:      wapiDER(s.roots...),
		})
	}
	for td, roots := range federated {
		resp.FederatedBundles[td] = wapiDER(roots...)
	}
	return resp
}

func wapiDER(certs ...*x509.Certificate) []byte {
	var out []byte
	for _, c := range certs {
		out = append(out, c.Raw...)
	}
	return out
}

// newWAPISource runs a source for a until the test ends and waits until it
// holds an SVID.
func newWAPISource(t *testing.T, a *wapiAgent, opts ...Option) *WorkloadAPISource {
	t.Helper()
	s := runWAPISource(t, a.addr(), opts...)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := WaitReady(ctx, s); err != nil {
		t.Fatalf("no SVID from the agent: %v", err)
	}
	return s
}

// runWAPISource creates a source for addr and runs it until the test ends.
func runWAPISource(t *testing.T, addr string, opts ...Option) *WorkloadAPISource {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	opts = append([]Option{WithLogger(wapiLogger(t)), WithBackoff(20*time.Millisecond, 200*time.Millisecond)}, opts...)
	s, err := NewWorkloadAPISource(ctx, addr, opts...)
	if err != nil {
		cancel()
		t.Fatalf("NewWorkloadAPISource: %v", err)
	}
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Run returned %v", err)
			}
		case <-time.After(30 * time.Second):
			t.Error("Run did not return after cancel")
		}
	})
	return s
}

func wapiLogger(t *testing.T) *slog.Logger {
	if !testing.Verbose() {
		return slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	return slog.New(slog.NewTextHandler(wapiTestWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type wapiTestWriter struct{ t *testing.T }

func (w wapiTestWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// wapiWaitFor polls cond (sources notify, but the test checks the state
// the notification is about) until it holds or 30 s pass.
func wapiWaitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after 30s waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// wapiHandshake completes one mTLS handshake between server and client
// sources over loopback and returns the IDs each side saw.
func wapiHandshake(server, client Source, serverAuthz, clientAuthz tlsconfig.Authorizer) (sawClient, sawServer spiffeid.ID, err error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return sawClient, sawServer, err
	}
	defer ln.Close()
	type result struct {
		id  spiffeid.ID
		err error
	}
	got := make(chan result, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			got <- result{err: err}
			return
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(30 * time.Second))
		tc := tls.Server(c, ServerConfig(server, serverAuthz))
		if err := tc.Handshake(); err != nil {
			got <- result{err: err}
			return
		}
		id, err := PeerID(tc.ConnectionState())
		_, _ = tc.Write([]byte("k"))
		got <- result{id: id, err: err}
	}()
	raw, err := net.DialTimeout("tcp", ln.Addr().String(), 30*time.Second)
	if err != nil {
		ln.Close()
		<-got
		return sawClient, sawServer, err
	}
	defer raw.Close()
	_ = raw.SetDeadline(time.Now().Add(30 * time.Second))
	tc := tls.Client(raw, ClientConfig(client, clientAuthz))
	if err = tc.Handshake(); err == nil {
		_, err = io.ReadFull(tc, make([]byte, 1))
	}
	if err == nil {
		sawServer, err = PeerID(tc.ConnectionState())
	}
	raw.Close() // unblocks the server if the client gave up
	r := <-got
	return r.id, sawServer, errors.Join(err, r.err)
}

func TestWorkloadAPISourceServesAgentSVIDsAndFederatedBundles(t *testing.T) {
	ca := testpki.New(t, "example.org")
	partner := testpki.New(t, "partner.test")
	agent := newWAPIAgent(t)
	agent.push(wapiResponse(t, map[string][]*x509.Certificate{"spiffe://partner.test": {partner.Root}},
		wapiSVID{ca.Issue(t, wapiClientID, time.Hour), []*x509.Certificate{ca.Root}},
		wapiSVID{ca.Issue(t, wapiServerID, time.Hour), []*x509.Certificate{ca.Root}}))

	client := newWAPISource(t, agent) // the first SVID is the default
	server := newWAPISource(t, agent, WithID(spiffeid.RequireFromString(wapiServerID)))

	for _, tc := range []struct {
		src  *WorkloadAPISource
		want string
	}{{client, wapiClientID}, {server, wapiServerID}} {
		st := tc.src.Status()
		if st.ID.String() != tc.want || st.Source != "workload-api" || st.LastError != "" {
			t.Errorf("Status = {ID %s, Source %q, LastError %q}, want {%s, workload-api, \"\"}", st.ID, st.Source, st.LastError, tc.want)
		}
		if got := trustDomainNames(st.TrustDomains); got != "example.org,partner.test" {
			t.Errorf("Status().TrustDomains = %s, want example.org,partner.test", got)
		}
		cert, err := tc.src.Certificate()
		if err != nil || cert.Leaf.URIs[0].String() != tc.want {
			t.Errorf("Certificate() = %v, %v; want a certificate for %s", cert, err, tc.want)
		}
		if err := tc.src.Ready(); err != nil {
			t.Errorf("Ready() = %v", err)
		}
		if tc.src.Generation() != 1 {
			t.Errorf("Generation() = %d, want 1", tc.src.Generation())
		}
		b, err := tc.src.GetX509BundleForTrustDomain(spiffeid.RequireTrustDomainFromString("partner.test"))
		if err != nil || !b.HasX509Authority(partner.Root) {
			t.Errorf("federated bundle = %v, %v; want partner.test's root", b, err)
		}
	}

	sawClient, sawServer, err := wapiHandshake(server, client,
		tlsconfig.AuthorizeID(spiffeid.RequireFromString(wapiClientID)),
		tlsconfig.AuthorizeID(spiffeid.RequireFromString(wapiServerID)))
	if err != nil {
		t.Fatalf("mTLS between the two Workload API identities: %v", err)
	}
	if sawClient.String() != wapiClientID || sawServer.String() != wapiServerID {
		t.Errorf("server saw %s, client saw %s; want %s and %s", sawClient, sawServer, wapiClientID, wapiServerID)
	}

	// A peer of the federated trust domain is verified with its bundle.
	federatedPeer := NewStatic(partner.Issue(t, wapiFederatedID, time.Hour), partner.Bundle(), ca.Bundle())
	if sawClient, _, err = wapiHandshake(server, federatedPeer, tlsconfig.AuthorizeAny(), tlsconfig.AuthorizeAny()); err != nil {
		t.Fatalf("handshake with a peer of the federated trust domain: %v", err)
	}
	if sawClient.String() != wapiFederatedID {
		t.Errorf("server saw %s, want %s", sawClient, wapiFederatedID)
	}
}

func trustDomainNames(tds []spiffeid.TrustDomain) string {
	names := make([]string, len(tds))
	for i, td := range tds {
		names[i] = td.Name()
	}
	return strings.Join(names, ",")
}

func TestWorkloadAPISourceAppliesPushedUpdatesLive(t *testing.T) {
	ca := testpki.New(t, "example.org")
	agent := newWAPIAgent(t)
	roots := []*x509.Certificate{ca.Root}
	first := wapiResponse(t, nil, wapiSVID{ca.Issue(t, wapiServerID, time.Hour), roots})
	agent.push(first)
	server := newWAPISource(t, agent)
	client := NewStatic(ca.Issue(t, wapiClientID, time.Hour), ca.Bundle())
	changes, unsubscribe := server.Subscribe()
	defer unsubscribe()

	// Handshakes run throughout; none may fail while updates land.
	var (
		stop       = make(chan struct{})
		done       = make(chan struct{})
		handshakes atomic.Int64
		failures   atomic.Int64
		firstErr   atomic.Value
	)
	go func() {
		defer close(done)
		for i := 0; i < 100000; i++ {
			select {
			case <-stop:
				return
			default:
			}
			if _, _, err := wapiHandshake(server, client, tlsconfig.AuthorizeAny(), tlsconfig.AuthorizeAny()); err != nil {
				failures.Add(1)
				firstErr.CompareAndSwap(nil, err.Error())
			}
			handshakes.Add(1)
		}
	}()

	successes := testutil.ToFloat64(metrics.CertRotations.WithLabelValues("success"))
	oldSerial := server.Status().Serial

	// 1. A new SVID: new serial, Generation 2, a notification, metrics.
	second := ca.Issue(t, wapiServerID, 2*time.Hour)
	agent.push(wapiResponse(t, nil, wapiSVID{second, roots}))
	wapiWaitFor(t, "the rotated SVID", func() bool { return server.Generation() == 2 })
	select {
	case <-changes:
	case <-time.After(30 * time.Second):
		t.Fatal("no notification after the rotation")
	}
	if st := server.Status(); st.Serial == oldSerial || st.Serial != serialString(second.Certificates[0].SerialNumber) {
		t.Errorf("serial after rotation = %s, want %x (was %s)", st.Serial, second.Certificates[0].SerialNumber, oldSerial)
	}
	if got := testutil.ToFloat64(metrics.CertRotations.WithLabelValues("success")) - successes; got != 1 {
		t.Errorf("cert_rotations_total{result=success} grew by %v, want 1", got)
	}
	if got, want := testutil.ToFloat64(metrics.CertExpiry), float64(second.Certificates[0].NotAfter.Unix()); got != want {
		t.Errorf("cert_expiry_timestamp_seconds = %v, want %v", got, want)
	}

	// 2. The same context again changes nothing; a bundle-only change
	// (a second root, as in a CA rotation) bumps Generation once and keeps
	// the SVID.
	agent.push(wapiResponse(t, nil, wapiSVID{second, roots}))
	nextCA := testpki.New(t, "example.org")
	agent.push(wapiResponse(t, nil, wapiSVID{second, []*x509.Certificate{ca.Root, nextCA.Root}}))
	wapiWaitFor(t, "the new root", func() bool {
		b, err := server.GetX509BundleForTrustDomain(ca.TrustDomain)
		return err == nil && b.HasX509Authority(nextCA.Root)
	})
	if g := server.Generation(); g != 3 {
		t.Errorf("Generation after an identical push and a bundle change = %d, want 3", g)
	}
	if st := server.Status(); st.Serial != serialString(second.Certificates[0].SerialNumber) {
		t.Errorf("a bundle-only update changed the serial to %s", st.Serial)
	}

	// 3. The new root is trusted at once: a peer issued by it is accepted.
	nextClient := NewStatic(nextCA.Issue(t, wapiClientID, time.Hour), ca.Bundle())
	if _, _, err := wapiHandshake(server, nextClient, tlsconfig.AuthorizeAny(), tlsconfig.AuthorizeAny()); err != nil {
		t.Errorf("peer under the newly pushed root refused: %v", err)
	}

	// Let a few handshakes run on the final state, then stop.
	base := handshakes.Load()
	wapiWaitFor(t, "handshakes after the last update", func() bool { return handshakes.Load() >= base+3 })
	close(stop)
	<-done
	if n := failures.Load(); n > 0 {
		t.Errorf("%d of %d handshakes failed across the updates; first: %v", n, handshakes.Load(), firstErr.Load())
	}
}

func TestWorkloadAPISourceReadySaysWhyNoSVIDCame(t *testing.T) {
	for _, tc := range []struct {
		name string
		// addr returns the address to dial; it may start an agent.
		addr func(t *testing.T) string
		want []string
	}{
		{
			name: "no agent listening",
			addr: func(t *testing.T) string { return "unix://" + filepath.Join(wapiShortDir(t), "missing.sock") },
			want: []string{"missing.sock", "no such file"},
		},
		{
			name: "workload matches no entry",
			addr: func(t *testing.T) string { return newWAPIAgent(t).addr() }, // pushes nothing: refuses
			want: []string{"PermissionDenied", "no identity issued"},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			addr := tc.addr(t)
			s := runWAPISource(t, addr)
			wapiWaitFor(t, "a watch error", func() bool { return s.Status().LastError != "" })
			ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
			defer cancel()
			err := WaitReady(ctx, s)
			if err == nil {
				t.Fatal("ready without an SVID")
			}
			if !errors.Is(err, ErrNoIdentity) {
				t.Errorf("error %q does not wrap ErrNoIdentity", err)
			}
			for _, w := range append(tc.want, addr) {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("WaitReady error %q does not mention %q", err, w)
				}
			}
			if _, err := s.Certificate(); !errors.Is(err, ErrNoIdentity) {
				t.Errorf("Certificate() error = %v, want ErrNoIdentity", err)
			}
		})
	}
}

func TestWorkloadAPISourceCloseEndsRunAndUnusedSource(t *testing.T) {
	agent := newWAPIAgent(t)
	ctx := context.Background()
	// Never run: Close releases the client.
	idle, err := NewWorkloadAPISource(ctx, agent.addr())
	if err != nil {
		t.Fatal(err)
	}
	if err := idle.Close(); err != nil {
		t.Errorf("Close of a source that never ran: %v", err)
	}
	// Running: Close ends Run, and a second Close is harmless.
	s, err := NewWorkloadAPISource(ctx, agent.addr())
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	wapiWaitFor(t, "Run to start", s.running.Load)
	if err := s.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Run returned %v after Close", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("Run did not return after Close")
	}
	if err := s.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if err := s.Run(ctx); err == nil {
		t.Error("a second Run succeeded")
	}
}

func TestNewWorkloadAPISourceRejectsBadAddress(t *testing.T) {
	for _, addr := range []string{"", "/run/spire/agent.sock", "http://127.0.0.1:8081", "unix://", "tcp://localhost:8081", "unix:///a.sock?x=1"} {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		s, err := NewWorkloadAPISource(ctx, addr)
		cancel()
		if err == nil {
			s.Close()
			t.Errorf("NewWorkloadAPISource(%q) succeeded", addr)
			continue
		}
		if addr != "" && !strings.Contains(err.Error(), addr) {
			t.Errorf("NewWorkloadAPISource(%q) error %q does not name the address", addr, err)
		}
	}
}

func TestWorkloadAPISourceRefusesBadUpdatesAndKeepsCurrent(t *testing.T) {
	ca := testpki.New(t, "example.org")
	other := testpki.New(t, "example.org") // same name, different keys
	foreign := testpki.New(t, "elsewhere.test")
	roots := []*x509.Certificate{ca.Root}
	good := wapiResponse(t, nil, wapiSVID{ca.Issue(t, wapiServerID, time.Hour), roots})

	byID := WithID(spiffeid.RequireFromString(wapiServerID))
	for _, tc := range []struct {
		name string
		opt  Option
		bad  *workload.X509SVIDResponse
		want string
	}{
		{
			name: "SVID does not chain to the pushed bundle",
			opt:  byID,
			bad:  wapiResponse(t, nil, wapiSVID{other.Issue(t, wapiServerID, time.Hour), roots}),
			want: "verify chain",
		},
		{
			name: "SVID of another trust domain",
			opt:  WithTrustDomain(ca.TrustDomain),
			bad:  wapiResponse(t, nil, wapiSVID{foreign.Issue(t, "spiffe://elsewhere.test/ns/demo/sa/server", time.Hour), []*x509.Certificate{foreign.Root}}),
			want: "not in trust domain example.org",
		},
		{
			name: "SVID for the wanted ID missing",
			opt:  byID,
			bad:  wapiResponse(t, nil, wapiSVID{ca.Issue(t, wapiClientID, time.Hour), roots}),
			want: "no SVID for " + wapiServerID,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			agent := newWAPIAgent(t)
			agent.push(good)
			src := newWAPISource(t, agent, tc.opt)
			before := src.Status()
			failures := testutil.ToFloat64(metrics.CertRotations.WithLabelValues("failure"))

			agent.push(tc.bad)
			wapiWaitFor(t, "the refusal", func() bool { return src.Status().LastError != "" })
			st := src.Status()
			if !strings.Contains(st.LastError, tc.want) || !strings.Contains(st.LastError, agent.addr()) {
				t.Errorf("Status().LastError = %q, want it to name %q and the agent", st.LastError, tc.want)
			}
			if st.Serial != before.Serial || src.Generation() != 1 {
				t.Errorf("refused update replaced the identity: serial %s→%s, generation %d", before.Serial, st.Serial, src.Generation())
			}
			if err := src.Ready(); err != nil {
				t.Errorf("Ready() = %v after a refused update; the current SVID is still valid", err)
			}
			if got := testutil.ToFloat64(metrics.CertRotations.WithLabelValues("failure")) - failures; got < 1 {
				t.Errorf("cert_rotations_total{result=failure} did not grow")
			}

			// The next good update clears the error.
			agent.push(wapiResponse(t, nil, wapiSVID{ca.Issue(t, wapiServerID, time.Hour), roots}))
			wapiWaitFor(t, "recovery", func() bool { return src.Status().LastError == "" && src.Generation() == 2 })
		})
	}
}

func TestWorkloadAPISourceSurvivesAgentRestart(t *testing.T) {
	ca := testpki.New(t, "example.org")
	roots := []*x509.Certificate{ca.Root}
	agent := newWAPIAgent(t)
	agent.push(wapiResponse(t, nil, wapiSVID{ca.Issue(t, wapiServerID, time.Hour), roots}))
	clock := &wapiClock{}
	src := newWAPISource(t, agent, WithClock(clock))
	cert, _ := src.Certificate()

	agent.stop()
	wapiWaitFor(t, "the source to notice the agent is gone", func() bool { return src.Status().LastError != "" })
	if got, _ := src.Certificate(); got != cert {
		t.Error("the certificate changed while the agent was down")
	}
	if err := src.Ready(); err != nil {
		t.Errorf("Ready() = %v while the agent is down but the SVID is valid", err)
	}
	if err := src.Rotate(context.Background()); err == nil || !strings.Contains(err.Error(), agent.addr()) {
		t.Errorf("Rotate with the agent down = %v, want an error naming %s", err, agent.addr())
	}

	// Past NotAfter (the clock jumps), Ready says the SVID expired and why
	// no new one came.
	clock.offset.Store(int64(2 * time.Hour))
	err := src.Ready()
	if err == nil || !errors.Is(err, ErrNoIdentity) || !strings.Contains(err.Error(), "expired") || !strings.Contains(err.Error(), agent.addr()) {
		t.Errorf("Ready() = %v, want ErrNoIdentity saying the certificate expired and the agent %s is unreachable", err, agent.addr())
	}
	clock.offset.Store(0)

	// The agent comes back with a renewed SVID; the source reconnects.
	renewed := ca.Issue(t, wapiServerID, time.Hour)
	agent.push(wapiResponse(t, nil, wapiSVID{renewed, roots}))
	agent.start()
	wapiWaitFor(t, "the renewed SVID after the agent restart", func() bool { return src.Generation() == 2 })
	if st := src.Status(); st.LastError != "" || st.Serial != serialString(renewed.Certificates[0].SerialNumber) {
		t.Errorf("after reconnect: serial %s, LastError %q; want %x and no error", st.Serial, st.LastError, renewed.Certificates[0].SerialNumber)
	}
	if err := src.Rotate(context.Background()); err != nil {
		t.Errorf("Rotate with the agent up = %v", err)
	}
	if src.Generation() != 2 {
		t.Errorf("Rotate of an unchanged context moved Generation to %d", src.Generation())
	}
}

type wapiClock struct{ offset atomic.Int64 }

func (c *wapiClock) Now() time.Time                         { return time.Now().Add(time.Duration(c.offset.Load())) }
func (c *wapiClock) After(d time.Duration) <-chan time.Time { return time.After(d) }

func TestWorkloadAPISourceCertificateDoesNotAllocate(t *testing.T) {
	ca := testpki.New(t, "example.org")
	agent := newWAPIAgent(t)
	agent.push(wapiResponse(t, nil, wapiSVID{ca.Issue(t, wapiServerID, time.Hour), []*x509.Certificate{ca.Root}}))
	src := newWAPISource(t, agent)
	if n := testing.AllocsPerRun(1000, func() { _, _ = src.Certificate() }); n != 0 {
		t.Errorf("Certificate allocates %v times per call, want 0", n)
	}
}
