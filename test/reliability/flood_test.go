package reliability

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	pb "istio.io/api/security/v1alpha1"

	"github.com/meshproxy/meshproxy/internal/e2eutil"
)

// Sizes of the floods: the hostile tester's numbers, scaled so the case runs
// in well under two minutes on two shared cores.
const (
	headerFloodRequests = 100
	headerFloodBytes    = 1 << 20 // metadata per request; the CA takes 16 KiB
	tokenFloodRequests  = 3000
	idleFloodConns      = 30000
	// idleFloodHeld bounds the flood connections this process holds at
	// once: more than the sidecar's cap under the usual limit of 20,000
	// descriptors ((20000 − 256) / 2), less than that limit.
	idleFloodHeld = 12000
	// memorySlack is how far above its baseline a process's RSS may stay
	// once a flood is over.
	memorySlack = 96 << 20
	// heapSlack is how far above its baseline the sidecar's Go heap may stay.
	heapSlack = 16 << 20
)

// A CA and a STRICT sidecar pair under three floods in turn: oversized
// request metadata and wrong bearer tokens at the CA, and 30,000 idle
// connections at the server sidecar. A valid CA caller (from another
// address) and a valid mesh client are served throughout, refusal logs stay
// sampled, and both processes' memory returns near its baseline.
func TestFloodsLeaveValidCallersServed(t *testing.T) {
	if testing.Short() {
		t.Skip("floods take half a minute; not in -short")
	}
	raiseNofile(t, idleFloodHeld+4000)
	mc := newMeshCA(t)
	caMetrics := e2eutil.FreeAddr(t)
	caProc := e2eutil.Start(t, binary, nil, "ca", "serve", "--dir", mc.dir, "--listen", mc.addr, "--auth", "token",
		"--tokens", mc.tokens, "--metrics", caMetrics, "--log-format", "json")
	e2eutil.Eventually(t, "ca listening", wait, func() error {
		c, err := net.DialTimeout("tcp", mc.addr, time.Second)
		if err == nil {
			c.Close()
		}
		return err
	})
	p := startPair(t, e2eutil.EchoApp(t), func(id string) []string { return mc.identity(id) })
	roots := x509.NewCertPool()
	rootPEM, err := os.ReadFile(mc.root)
	if err != nil || !roots.AppendCertsFromPEM(rootPEM) {
		t.Fatalf("CA root %s: %v", mc.root, err)
	}
	token, err := os.ReadFile(mc.tokenFiles[clientID])
	if err != nil {
		t.Fatal(err)
	}
	valid := newCAClient(t, mc.addr, roots, "127.0.0.2")

	// Valid callers, all along: a CSR with a good token from another
	// address, and lines over a mesh connection through the sidecar pair
	// (new connections past the sidecar's cap are refused by design; they
	// are checked once the idle flood is over).
	meshConn, err := net.DialTimeout("tcp", p.entry, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer meshConn.Close()
	meshReader := bufio.NewReader(meshConn)
	var served, failed atomic.Int64
	var firstErr atomic.Value
	stop := make(chan struct{})
	var callers sync.WaitGroup
	call := func(what string, fn func() error) {
		if err := fn(); err != nil {
			failed.Add(1)
			firstErr.CompareAndSwap(nil, what+": "+err.Error())
			return
		}
		served.Add(1)
	}
	callers.Go(func() {
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			case <-time.After(200 * time.Millisecond):
			}
			call("valid CSR", func() error { return issue(valid, strings.TrimSpace(string(token))) })
			call("mesh connection", func() error { return echoLine(meshConn, meshReader, fmt.Sprintf("valid %d", i)) })
		}
	})
	defer func() {
		select {
		case <-stop:
		default:
			close(stop)
		}
		callers.Wait()
	}()
	for i := range 20 { // warm up before the baselines
		if err := exchange(p.entry, fmt.Sprintf("warm-up %d", i)); err != nil {
			t.Fatal(err)
		}
	}
	caBase, sideBase := rss(t, caProc.PID()), rss(t, p.serverProc.PID())
	sideHeapBase := heapAfterGC(t, p.server)
	sideRes := backToBaseline(t, "server sidecar before", p.server, p.serverProc, sample(t, p.server, p.serverProc))

	// 1. Oversized metadata: the CA must not hold it.
	var wg sync.WaitGroup
	for range headerFloodRequests {
		wg.Go(func() { headerFlood(mc.addr, roots, headerFloodBytes) })
	}
	wg.Wait()
	caPeak := rss(t, caProc.PID())
	t.Logf("header flood: %d requests of %d KiB metadata; CA RSS %d → %d MiB", headerFloodRequests, headerFloodBytes>>10, caBase>>20, caPeak>>20)

	// 2. Wrong tokens from one address: throttled, logs sampled.
	guesser := newCAClient(t, mc.addr, roots, "127.0.0.1")
	var next atomic.Int64
	for range 16 {
		wg.Go(func() {
			for next.Add(1) <= tokenFloodRequests {
				_ = issue(guesser, fmt.Sprintf("guess-%d", next.Load()))
			}
		})
	}
	wg.Wait()
	throttled, err := e2eutil.Metric("http://"+caMetrics+"/metrics", "meshproxy_ca_auth_throttled_total")
	if err != nil || throttled < tokenFloodRequests/2 {
		t.Errorf("token flood: meshproxy_ca_auth_throttled_total = %v (%v), want most of %d", throttled, err, tokenFloodRequests)
	}
	refusedLines := len(logEntries(caProc, "csr refused")) + len(logEntries(caProc, "csr refused: too many failed authentications from this address"))
	if refusedLines >= tokenFloodRequests/4 {
		t.Errorf("token flood: %d refusal log lines for %d refusals: not sampled", refusedLines, tokenFloodRequests)
	}
	t.Logf("token flood: %d wrong tokens, %v throttled, %d refusal log lines", tokenFloodRequests, throttled, refusedLines)

	// 3. Idle connections at the server sidecar's mesh listener, from two
	// source addresses (a loopback address has ~28,000 ephemeral ports).
	// The sidecar holds them up to its --max-connections and closes the
	// rest at once; this process lets go of those it closed, so it needs no
	// more descriptors than the sidecar's cap.
	fl := &idleFlood{max: idleFloodHeld}
	deadline := time.Now().Add(90 * time.Second)
	for w := range 16 {
		src := &net.TCPAddr{IP: net.IPv4(127, 0, 0, byte(3+w%2))}
		wg.Go(func() { fl.run(p.inbound, src, idleFloodConns/16, deadline) })
	}
	wg.Wait()
	for _, path := range []string{"http://" + p.server.Admin + "/identity", "http://" + p.server.Health + "/healthz/ready"} {
		if code, body, err := e2eutil.HTTPGet(path); err != nil || code != http.StatusOK {
			t.Errorf("during the idle flood, GET %s: %d %v %.200s", path, code, err, body)
		}
	}
	overLimit, _ := p.server.Metric("meshproxy_connections_total", "direction", "inbound", "mode", "unknown", "decision", "over_limit")
	sidePeak := rss(t, p.serverProc.PID())
	t.Logf("idle flood: %d connections opened (%d dials failed), %d still held, %v refused over the cap; sidecar RSS %d → %d MiB",
		fl.opened.Load(), fl.failed.Load(), len(fl.held), overLimit, sideBase>>20, sidePeak>>20)
	if fl.opened.Load() < idleFloodConns*9/10 {
		t.Errorf("only %d of %d flood connections opened", fl.opened.Load(), idleFloodConns)
	}
	fl.closeAll()

	close(stop)
	callers.Wait()
	if n := failed.Load(); n > 0 || served.Load() == 0 {
		t.Errorf("valid callers: %d failed, %d served during the floods; first failure: %v", n, served.Load(), firstErr.Load())
	}
	for i := range 20 {
		if err := exchange(p.entry, fmt.Sprintf("after the floods %d", i)); err != nil {
			t.Errorf("new mesh connection after the floods: %v", err)
		}
	}
	// Memory back near its baseline: the CA's resident set, and the
	// sidecar's Go heap after a collection (its freed pages go back to the
	// kernel only slowly, so its resident set is logged, not bounded).
	var caLast int64
	e2eutil.Eventually(t, "CA memory back near baseline", wait, func() error {
		if caLast = rss(t, caProc.PID()); caLast > caBase+memorySlack {
			return fmt.Errorf("RSS %d MiB, baseline %d MiB", caLast>>20, caBase>>20)
		}
		return nil
	})
	var heapLast float64
	e2eutil.Eventually(t, "sidecar heap back near baseline", wait, func() error {
		if heapLast = heapAfterGC(t, p.server); heapLast > sideHeapBase+heapSlack {
			return fmt.Errorf("heap in use %.1f MiB, baseline %.1f MiB", heapLast/(1<<20), sideHeapBase/(1<<20))
		}
		return nil
	})
	backToBaseline(t, "server sidecar goroutines and descriptors", p.server, p.serverProc, sideRes)
	t.Logf("after the floods: CA RSS %d MiB (baseline %d MiB); sidecar heap %.1f MiB (baseline %.1f MiB), RSS %d MiB (baseline %d MiB)",
		caLast>>20, caBase>>20, heapLast/(1<<20), sideHeapBase/(1<<20), rss(t, p.serverProc.PID())>>20, sideBase>>20)
}

// heapAfterGC is a sidecar's Go heap in use right after a collection (the
// admin API's heap profile with gc=1 runs one).
func heapAfterGC(t *testing.T, s e2eutil.Sidecar) float64 {
	t.Helper()
	if code, _, err := e2eutil.HTTPGet("http://" + s.Admin + "/debug/pprof/heap?gc=1"); err != nil || code != http.StatusOK {
		t.Fatalf("heap profile: %d %v", code, err)
	}
	v, err := s.Metric("go_memstats_heap_inuse_bytes")
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// raiseNofile lifts this process's soft descriptor limit to the hard one
// (the children inherit it), and skips the test if that is under n.
func raiseNofile(t *testing.T, n uint64) {
	t.Helper()
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	if lim.Max < n {
		t.Skipf("the hard RLIMIT_NOFILE is %d; this test needs %d descriptors", lim.Max, n)
	}
	if lim.Cur >= n {
		return
	}
	orig := lim
	lim.Cur = lim.Max
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatalf("raise RLIMIT_NOFILE to %d: %v", lim.Max, err)
	}
	t.Cleanup(func() { _ = syscall.Setrlimit(syscall.RLIMIT_NOFILE, &orig) })
}

// idleFlood opens connections that never send a byte, holding at most max
// of them: when full it lets go of those the server has closed.
type idleFlood struct {
	max            int
	opened, failed atomic.Int64
	mu             sync.Mutex
	held           []net.Conn
}

// run opens n connections to addr from src, until deadline.
func (f *idleFlood) run(addr string, src *net.TCPAddr, n int, deadline time.Time) {
	d := net.Dialer{LocalAddr: src, Timeout: 10 * time.Second}
	for i := 0; i < n && time.Now().Before(deadline); {
		if !f.room() {
			time.Sleep(5 * time.Millisecond)
			continue
		}
		i++
		c, err := d.Dial("tcp", addr)
		if err != nil {
			f.failed.Add(1)
			continue
		}
		f.opened.Add(1)
		f.mu.Lock()
		f.held = append(f.held, c)
		f.mu.Unlock()
	}
}

// room says whether another connection may be held, first closing the
// held ones the server has closed if there is none.
func (f *idleFlood) room() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.held) < f.max {
		return true
	}
	kept := f.held[:0]
	for _, c := range f.held {
		if closedByServer(c) {
			c.Close()
			continue
		}
		kept = append(kept, c)
	}
	clear(f.held[len(kept):])
	f.held = kept
	return len(f.held) < f.max
}

func (f *idleFlood) closeAll() {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, c := range f.held {
		c.Close()
	}
	f.held = nil
}

// closedByServer peeks at c without blocking: end of stream or an error
// means the server closed it.
func closedByServer(c net.Conn) bool {
	sc, err := c.(*net.TCPConn).SyscallConn()
	if err != nil {
		return true
	}
	closed := false
	_ = sc.Read(func(fd uintptr) bool {
		var b [1]byte
		n, _, err := syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
		closed = (n == 0 && err == nil) || (err != nil && err != syscall.EAGAIN)
		return true
	})
	return closed
}

// rss is a process's resident set size in bytes.
func rss(t *testing.T, pid int) int64 {
	t.Helper()
	data, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			if err != nil {
				t.Fatal(err)
			}
			return kb << 10
		}
	}
	t.Fatalf("no VmRSS for pid %d", pid)
	return 0
}

// newCAClient is a gRPC client of the CA whose connections come from the
// loopback address src.
func newCAClient(t *testing.T, addr string, roots *x509.CertPool, src string) pb.IstioCertificateServiceClient {
	t.Helper()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}}
	cc, err := grpc.NewClient("passthrough:///"+addr,
		grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{RootCAs: roots, ServerName: "localhost", MinVersion: tls.VersionTLS12})),
		grpc.WithContextDialer(func(ctx context.Context, a string) (net.Conn, error) { return d.DialContext(ctx, "tcp", a) }))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cc.Close() })
	return pb.NewIstioCertificateServiceClient(cc)
}

// issue asks the CA for a certificate with a fresh key and token.
func issue(c pb.IstioCertificateServiceClient, token string) error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token)
	_, err = c.CreateCertificate(ctx, &pb.IstioCertificateRequest{Csr: string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}))})
	return err
}

// headerFlood opens an HTTP/2 connection to the CA and sends one request
// whose header block (HEADERS and CONTINUATION frames) carries size bytes
// of metadata, as a hostile client would; whatever the CA answers, it reads
// until the CA closes or 30 s pass.
func headerFlood(addr string, roots *x509.CertPool, size int) {
	conn, err := tls.Dial("tcp", addr, &tls.Config{RootCAs: roots, ServerName: "localhost", NextProtos: []string{"h2"}, MinVersion: tls.VersionTLS12})
	if err != nil {
		return
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := io.WriteString(conn, http2.ClientPreface); err != nil {
		return
	}
	fr := http2.NewFramer(conn, conn)
	if err := fr.WriteSettings(); err != nil {
		return
	}
	var block bytes.Buffer
	enc := hpack.NewEncoder(&block)
	for _, f := range [][2]string{
		{":method", "POST"}, {":scheme", "https"}, {":authority", "localhost"},
		{":path", "/istio.v1.auth.IstioCertificateService/CreateCertificate"},
		{"content-type", "application/grpc"}, {"te", "trailers"}, {"authorization", "Bearer wrong"},
	} {
		_ = enc.WriteField(hpack.HeaderField{Name: f[0], Value: f[1]})
	}
	junk := strings.Repeat("j", 8<<10)
	for i := 0; block.Len() < size; i++ {
		_ = enc.WriteField(hpack.HeaderField{Name: "x-junk-" + strconv.Itoa(i), Value: junk, Sensitive: true})
	}
	b := block.Bytes()
	const chunk = 16 << 10
	if err := fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: b[:chunk]}); err != nil {
		return
	}
	for off := chunk; off < len(b); off += chunk {
		end := min(off+chunk, len(b))
		if err := fr.WriteContinuation(1, end == len(b), b[off:end]); err != nil {
			return
		}
	}
	_, _ = io.Copy(io.Discard, conn)
}
