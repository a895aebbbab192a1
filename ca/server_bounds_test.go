package ca

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	pb "istio.io/api/security/v1alpha1"

	"github.com/meshproxy/meshproxy/metrics"
)

// withThrottleClock replaces the failed-authentication throttle's clock.
func withThrottleClock(now func() time.Time) ServerOption {
	return func(o *serverOptions) { o.now = now }
}

// clientFrom dials the CA from the local address src (a loopback address).
func (tc *testCA) clientFrom(t *testing.T, src string) pb.IstioCertificateServiceClient {
	t.Helper()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}}
	conf := &tls.Config{RootCAs: tc.roots, ServerName: "localhost", MinVersion: tls.VersionTLS12}
	cc, err := grpc.NewClient("passthrough:///"+tc.addr, grpc.WithTransportCredentials(credentials.NewTLS(conf)),
		grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) { return d.DialContext(ctx, "tcp", addr) }))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cc.Close() })
	return pb.NewIstioCertificateServiceClient(cc)
}

func TestFailedAuthenticationsAreThrottledPerSource(t *testing.T) {
	var mu sync.Mutex
	now := time.Unix(1_700_000_000, 0)
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	tc := startCA(t, nil, withThrottleClock(clock))
	guesser := tc.clientFrom(t, "127.0.0.1")
	csr := string(csrPEM(csrDER(t, p256(t), nil)))
	throttledBefore := testutil.ToFloat64(metrics.CAAuthThrottled)

	codesSeen := map[codes.Code]int{}
	var last error
	var hdr metadata.MD
	for range DefaultAuthFailBurst + 30 {
		_, last = guesser.CreateCertificate(withToken(testCtx(t), "guess"), &pb.IstioCertificateRequest{Csr: csr}, grpc.Header(&hdr))
		codesSeen[status.Code(last)]++
	}
	if codesSeen[codes.Unauthenticated] != DefaultAuthFailBurst || codesSeen[codes.ResourceExhausted] != 30 {
		t.Fatalf("80 wrong tokens from one address: %v; want %d Unauthenticated then ResourceExhausted", codesSeen, DefaultAuthFailBurst)
	}
	st := status.Convert(last)
	var retry *errdetails.RetryInfo
	for _, d := range st.Details() {
		if r, ok := d.(*errdetails.RetryInfo); ok {
			retry = r
		}
	}
	if retry == nil || retry.GetRetryDelay().AsDuration() <= 0 || len(hdr.Get("retry-after")) != 1 || hdr.Get("retry-after")[0] != "1" {
		t.Fatalf("throttled answer carries no retry delay: %v details %v header %v", st, st.Details(), hdr)
	}
	if got := testutil.ToFloat64(metrics.CAAuthThrottled) - throttledBefore; got != 30 {
		t.Fatalf("meshproxy_ca_auth_throttled_total grew by %v, want 30", got)
	}
	// While that address is throttled, a valid caller from another address
	// is served; the throttled address, even with a valid token, is not.
	if _, err := tc.clientFrom(t, "127.0.0.2").CreateCertificate(withToken(testCtx(t), "client-token"), &pb.IstioCertificateRequest{Csr: csr}); err != nil {
		t.Fatalf("valid caller from another address: %v", err)
	}
	if _, err := guesser.CreateCertificate(withToken(testCtx(t), "client-token"), &pb.IstioCertificateRequest{Csr: csr}); status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("throttled address with a valid token: %v, want ResourceExhausted", err)
	}
	// A second later the bucket holds DefaultAuthFailRate attempts again.
	mu.Lock()
	now = now.Add(time.Second)
	mu.Unlock()
	if _, err := guesser.CreateCertificate(withToken(testCtx(t), "client-token"), &pb.IstioCertificateRequest{Csr: csr}); err != nil {
		t.Fatalf("a second later, a valid token from the guesser's address: %v", err)
	}
}

func TestOversizedRequestHeadersAreRefused(t *testing.T) {
	tc := startCA(t, nil)
	client := tc.client(t, "localhost", nil)
	csr := string(csrPEM(csrDER(t, p256(t), nil)))
	junk := strings.Repeat("x", MaxHeaderListSize)
	ctx := metadata.AppendToOutgoingContext(withToken(testCtx(t), "client-token"), "x-junk", junk)
	if _, err := client.CreateCertificate(ctx, &pb.IstioCertificateRequest{Csr: csr}); err == nil {
		t.Fatalf("a request with %d bytes of metadata was served", len(junk))
	}
	if _, err := client.CreateCertificate(withToken(testCtx(t), "client-token"), &pb.IstioCertificateRequest{Csr: csr}); err != nil {
		t.Fatalf("a normal request after the oversized one: %v", err)
	}
}

func TestConnectionsPastTheLimitAreClosed(t *testing.T) {
	tc := startCA(t, nil, WithMaxConnections(3))
	refusedBefore := testutil.ToFloat64(metrics.CAConnectionsRefused)
	var held []net.Conn
	for range 3 {
		c, err := net.Dial("tcp", tc.addr)
		if err != nil {
			t.Fatal(err)
		}
		held = append(held, c)
	}
	over, err := net.Dial("tcp", tc.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer over.Close()
	_ = over.SetReadDeadline(time.Now().Add(30 * time.Second))
	if _, err := over.Read(make([]byte, 1)); !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) && !strings.Contains(errString(err), "reset") {
		t.Fatalf("connection past --max-connections: read %v, want it closed", err)
	}
	if got := testutil.ToFloat64(metrics.CAConnectionsRefused) - refusedBefore; got != 1 {
		t.Fatalf("meshproxy_ca_connections_refused_total grew by %v, want 1", got)
	}
	// Freeing a slot lets a valid caller in.
	for _, c := range held {
		c.Close()
	}
	csr := string(csrPEM(csrDER(t, p256(t), nil)))
	var lastErr error
	for range 50 { // the server notices the closes asynchronously
		if _, lastErr = tc.client(t, "localhost", nil).CreateCertificate(withToken(testCtx(t), "client-token"), &pb.IstioCertificateRequest{Csr: csr}); lastErr == nil {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("after the held connections closed, a valid caller: %v", lastErr)
}
