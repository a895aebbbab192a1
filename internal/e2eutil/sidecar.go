package e2eutil

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/meshproxy/meshproxy/internal/testpki"
)

// Ports handed to processes are drawn below the kernel's ephemeral range
// (32768 and up by default), so an outgoing connection or a ":0" listener
// cannot take one between FreeAddr and the process binding it, and never
// twice in one test process.
const (
	portLow  = 20000
	portHigh = 32000
)

var (
	portsMu sync.Mutex
	given   = map[int]bool{}
)

// FreeAddr returns a loopback address whose port is free right now and has
// not been returned before in this process.
func FreeAddr(t testing.TB) string {
	t.Helper()
	portsMu.Lock()
	defer portsMu.Unlock()
	for range 1000 {
		port := portLow + rand.IntN(portHigh-portLow)
		if given[port] {
			continue
		}
		addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
		l, err := net.Listen("tcp", addr)
		if err != nil {
			continue
		}
		l.Close()
		given[port] = true
		return addr
	}
	t.Fatal("e2eutil: no free loopback port found in 1000 tries")
	return ""
}

// Eventually retries fn every 50 ms until it returns nil, failing the test
// with fn's last error if within passes first.
func Eventually(t testing.TB, what string, within time.Duration, fn func() error) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		err := fn()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: still failing after %s: %v", what, within, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// client makes one connection per request, so no idle keep-alive connection
// stays open in the sidecar between samples of its descriptors.
var client = &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}

// HTTPGet returns the status and body of a GET.
func HTTPGet(url string) (int, string, error) { return do(http.MethodGet, url) }

// HTTPPost returns the status and body of a POST without a body.
func HTTPPost(url string) (int, string, error) { return do(http.MethodPost, url) }

func do(method, url string) (int, string, error) {
	req, err := http.NewRequest(method, url, nil)
	if err != nil {
		return 0, "", err
	}
	resp, err := client.Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), err
}

// Sidecar holds the addresses of one sidecar process's HTTP endpoints.
type Sidecar struct {
	Admin, Health, Metrics string
}

// NewSidecar picks free loopback addresses for a sidecar's endpoints.
func NewSidecar(t testing.TB) Sidecar {
	return Sidecar{Admin: FreeAddr(t), Health: FreeAddr(t), Metrics: FreeAddr(t)}
}

// Flags are the `meshproxy run` flags binding the endpoints.
func (s Sidecar) Flags() []string {
	return []string{"--admin", s.Admin, "--health", s.Health, "--metrics", s.Metrics}
}

// Ready returns nil when /healthz/ready answers 200.
func (s Sidecar) Ready() error {
	code, body, err := HTTPGet("http://" + s.Health + "/healthz/ready")
	if err != nil {
		return err
	}
	if code != http.StatusOK {
		return fmt.Errorf("%d %s", code, strings.TrimSpace(body))
	}
	return nil
}

// WaitReady waits (up to 30 s) for the sidecar to be ready.
func (s Sidecar) WaitReady(t testing.TB) {
	t.Helper()
	Eventually(t, "sidecar ready on "+s.Health, 30*time.Second, s.Ready)
}

// Identity is the part of GET /identity the tests read.
type Identity struct {
	SPIFFEID  string    `json:"spiffe_id"`
	Serial    string    `json:"serial"`
	NotAfter  time.Time `json:"not_after"`
	BundlePEM string    `json:"bundle_pem"`
}

// Identity fetches GET /identity.
func (s Sidecar) Identity() (Identity, error) {
	code, body, err := HTTPGet("http://" + s.Admin + "/identity")
	if err != nil {
		return Identity{}, err
	}
	if code != http.StatusOK {
		return Identity{}, fmt.Errorf("/identity: %d %s", code, strings.TrimSpace(body))
	}
	var id Identity
	if err := json.Unmarshal([]byte(body), &id); err != nil {
		return Identity{}, fmt.Errorf("/identity: %w", err)
	}
	return id, nil
}

// Rotate forces a renewal with POST /rotate and returns the new identity.
func (s Sidecar) Rotate() (Identity, error) {
	code, body, err := HTTPPost("http://" + s.Admin + "/rotate")
	// The admin API starts at most one renewal a second and answers 429
	// (Retry-After: 1) within it: wait and ask again, a few times.
	for range 5 {
		if err != nil || code != http.StatusTooManyRequests {
			break
		}
		time.Sleep(time.Second)
		code, body, err = HTTPPost("http://" + s.Admin + "/rotate")
	}
	if err != nil {
		return Identity{}, err
	}
	if code != http.StatusOK {
		return Identity{}, fmt.Errorf("/rotate: %d %s", code, strings.TrimSpace(body))
	}
	var id Identity
	if err := json.Unmarshal([]byte(body), &id); err != nil {
		return Identity{}, fmt.Errorf("/rotate: %w", err)
	}
	return id, nil
}

// Metric returns the value of the sample of metric name whose labels
// include every name="value" pair of labels (0 if there is none).
func (s Sidecar) Metric(name string, labels ...string) (float64, error) {
	return Metric("http://"+s.Metrics+"/metrics", name, labels...)
}

// Metric reads the Prometheus text exposition at url and returns the sum
// of the samples of metric name carrying every label pair of labels, given
// as "key", "value", ... (0 if none match).
func Metric(url, name string, labels ...string) (float64, error) {
	code, body, err := HTTPGet(url)
	if err != nil {
		return 0, err
	}
	if code != http.StatusOK {
		return 0, fmt.Errorf("%s: status %d", url, code)
	}
	var want []string
	for i := 0; i+1 < len(labels); i += 2 {
		want = append(want, labels[i]+"="+strconv.Quote(labels[i+1]))
	}
	var sum float64
	sc := bufio.NewScanner(strings.NewReader(body))
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "#") {
			continue
		}
		series, value, ok := strings.Cut(line, " ")
		if !ok {
			continue
		}
		metric, lbls, _ := strings.Cut(series, "{")
		if metric != name {
			continue
		}
		set := strings.Split(strings.TrimSuffix(lbls, "}"), ",")
		match := true
		for _, w := range want {
			found := false
			for _, l := range set {
				if l == w {
					found = true
					break
				}
			}
			match = match && found
		}
		if !match {
			continue
		}
		v, err := strconv.ParseFloat(strings.Fields(value)[0], 64)
		if err != nil {
			return 0, fmt.Errorf("%s: %q: %w", name, line, err)
		}
		sum += v
	}
	return sum, sc.Err()
}

// Goroutines is the sidecar's goroutine count from the admin API's
// /debug/pprof/goroutine?debug=1 ("goroutine profile: total N").
func (s Sidecar) Goroutines() (int, error) {
	code, body, err := HTTPGet("http://" + s.Admin + "/debug/pprof/goroutine?debug=1")
	if err != nil {
		return 0, err
	}
	if code != http.StatusOK {
		return 0, fmt.Errorf("pprof goroutine: status %d", code)
	}
	first, _, _ := strings.Cut(body, "\n")
	var n int
	if _, err := fmt.Sscanf(first, "goroutine profile: total %d", &n); err != nil {
		return 0, fmt.Errorf("pprof goroutine: first line %q: %w", first, err)
	}
	return n, nil
}

// OpenFDs counts the open file descriptors of process pid (/proc/PID/fd).
func OpenFDs(pid int) (int, error) {
	entries, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		return 0, fmt.Errorf("open descriptors of %d: %w", pid, err)
	}
	return len(entries), nil
}

// FileIdentity writes an SVID for id issued by ca into a fresh directory
// and returns the identity flags of `meshproxy run`.
func FileIdentity(t testing.TB, ca *testpki.CA, id string) []string {
	t.Helper()
	dir := t.TempDir()
	cert, key, bundle := ca.WriteSVID(t, dir, ca.Issue(t, id, time.Hour))
	return []string{"--cert-file", cert, "--key-file", key, "--bundle-file", bundle}
}

// EchoApp is a TCP server on loopback that echoes every byte back and
// half-closes when the client does; it stops at cleanup.
func EchoApp(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ServeEcho(t, ln)
	return ln.Addr().String()
}

// ServeEcho echoes every byte of each connection accepted on ln (plain TCP
// or TLS) back, and half-closes when the client does; ln is closed at
// cleanup.
func ServeEcho(t testing.TB, ln net.Listener) {
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_, _ = io.Copy(c, c)
				if cw, ok := c.(interface{ CloseWrite() error }); ok {
					_ = cw.CloseWrite()
				}
			}()
		}
	}()
}
