package proxy

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/x509"
	"fmt"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/meshproxy/meshproxy/internal/testpki"
	"github.com/meshproxy/meshproxy/tlsmgr"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// pkiIssuer signs CSRs for one identity with a test PKI's intermediate, as
// the CA would; it lets a real tlsmgr.Rotator rotate in-process.
type pkiIssuer struct {
	ca *testpki.CA
	id spiffeid.ID
}

func (i pkiIssuer) Issue(ctx context.Context, csrDER []byte, ttl time.Duration) (*tlsmgr.Issued, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	req, err := x509.ParseCertificateRequest(csrDER)
	if err != nil {
		return nil, err
	}
	if err := req.CheckSignature(); err != nil {
		return nil, err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
	if err != nil {
		return nil, err
	}
	now := time.Now()
	der, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{
		SerialNumber: serial,
		NotBefore:    now.Add(-time.Minute),
		NotAfter:     now.Add(ttl),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		URIs:         []*url.URL{i.id.URL()},
	}, i.ca.Intermediate, req.PublicKey, i.ca.IntermediateKey)
	if err != nil {
		return nil, err
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return &tlsmgr.Issued{Chain: []*x509.Certificate{leaf, i.ca.Intermediate}, Roots: []*x509.Certificate{i.ca.Root}}, nil
}

// runRotator starts a Rotator for id with extra roots from bundleFile and
// stops it at cleanup.
func runRotator(t *testing.T, ca *testpki.CA, id, bundleFile string) *tlsmgr.Rotator {
	t.Helper()
	r, err := tlsmgr.NewRotator(pkiIssuer{ca: ca, id: mustID(t, id)}, tlsmgr.WithLogger(quietLog),
		tlsmgr.WithBundleFile(bundleFile), tlsmgr.WithPollInterval(100*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = r.Run(ctx)
	}()
	t.Cleanup(func() { cancel(); <-done })
	wctx, wcancel := context.WithTimeout(context.Background(), clientWait)
	defer wcancel()
	if err := tlsmgr.WaitReady(wctx, r); err != nil {
		t.Fatalf("rotator for %s: %v", id, err)
	}
	return r
}

// TestRotationsAndBundleChangeUnderLoadInProcess is the race-detector twin
// of test/reliability's multi-process test: real Rotators behind a proxy
// pair, rotated 100 times each and given a second root mid-way, while new
// and kept connections run. Not one request may fail.
func TestRotationsAndBundleChangeUnderLoadInProcess(t *testing.T) {
	rotations := 100
	if testing.Short() {
		rotations = 20
	}
	m := newMesh(t)
	bundle := filepath.Join(t.TempDir(), "bundle.pem")
	testpki.WriteFile(t, bundle, testpki.PEMCerts(m.ca.Root))
	serverSrc := runRotator(t, m.ca, echoID, bundle)
	clientSrc := runRotator(t, m.ca, webID, bundle)

	a := startApp(t, echo)
	st, _ := policyStore(t, peerAuth("STRICT"))
	server := startProxy(t, serverSrc, st, WithInboundExplicit("127.0.0.1:0", a.addr()))
	cst, _ := policyStore(t, "")
	client := startProxy(t, clientSrc, cst, WithOutboundExplicit("127.0.0.1:0", server.Addrs()[0].String(), mustID(t, echoID)))
	entry := client.Addrs()[0].String()

	var (
		stop               = make(chan struct{})
		wg                 sync.WaitGroup
		newConns, keptRTTs atomic.Int64
		failures           atomic.Int64
		firstErr           atomic.Value
	)
	fail := func(err error) {
		failures.Add(1)
		firstErr.CompareAndSwap(nil, err.Error())
	}
	stopped := func() bool {
		select {
		case <-stop:
			return true
		default:
			return false
		}
	}
	for w := range 2 {
		wg.Go(func() {
			for i := 0; !stopped(); i++ {
				c, err := net.DialTimeout("tcp", entry, clientWait)
				if err != nil {
					fail(err)
					continue
				}
				_ = c.SetDeadline(time.Now().Add(clientWait))
				if err := roundTrip(c, fmt.Sprintf("new %d-%d\n", w, i)); err != nil {
					fail(fmt.Errorf("new connection: %w", err))
				} else {
					newConns.Add(1)
				}
				c.Close()
			}
		})
	}
	for k := range 2 {
		c := dial(t, entry)
		r := bufio.NewReader(c)
		wg.Go(func() {
			for i := 0; !stopped(); i++ {
				_ = c.SetDeadline(time.Now().Add(clientWait))
				msg := fmt.Sprintf("kept %d-%d\n", k, i)
				if _, err := c.Write([]byte(msg)); err != nil {
					fail(fmt.Errorf("kept connection: %w", err))
					return
				}
				if got, err := r.ReadString('\n'); err != nil || got != msg {
					fail(fmt.Errorf("kept connection: %q, %v", got, err))
					return
				}
				keptRTTs.Add(1)
			}
		})
	}

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	for i := range rotations {
		for _, src := range []*tlsmgr.Rotator{clientSrc, serverSrc} {
			if err := src.Rotate(ctx); err != nil {
				t.Errorf("rotation %d: %v", i, err)
			}
		}
		if i == rotations/2 {
			next := testpki.New(t, "cluster.local")
			tmp := bundle + ".tmp"
			testpki.WriteFile(t, tmp, append(testpki.PEMCerts(m.ca.Root), testpki.PEMCerts(next.Root)...))
			if err := os.Rename(tmp, bundle); err != nil {
				t.Fatal(err)
			}
			for _, src := range []*tlsmgr.Rotator{clientSrc, serverSrc} {
				eventually(t, "second root loaded", func() bool {
					b, err := src.GetX509BundleForTrustDomain(m.ca.TrustDomain)
					return err == nil && len(b.X509Authorities()) == 2
				})
			}
		}
	}
	n := newConns.Load()
	eventually(t, "new connections on the final certificates", func() bool { return newConns.Load() >= n+10 })
	close(stop)
	wg.Wait()

	if f := failures.Load(); f > 0 {
		t.Fatalf("%d requests failed during %d rotations per side; first: %v", f, rotations, firstErr.Load())
	}
	if clientSrc.Generation() < uint64(rotations) || serverSrc.Generation() < uint64(rotations) {
		t.Errorf("generations %d and %d after %d rotations", clientSrc.Generation(), serverSrc.Generation(), rotations)
	}
	t.Logf("%d rotations per side: %d new connections, %d round trips on kept connections, none failed", rotations, newConns.Load(), keptRTTs.Load())
}
