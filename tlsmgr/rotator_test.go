package tlsmgr

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/x509"
	"encoding/base64"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"

	"github.com/meshproxy/meshproxy/internal/testpki"
	"github.com/meshproxy/meshproxy/metrics"
)

const (
	serverID = "spiffe://cluster.local/ns/default/sa/server"
	clientID = "spiffe://cluster.local/ns/default/sa/client"
)

// runRotator starts r.Run and stops it when the test ends.
func runRotator(t *testing.T, r *Rotator) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
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
}

func waitReady(t *testing.T, srcs ...Source) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for _, s := range srcs {
		if err := WaitReady(ctx, s); err != nil {
			t.Fatalf("source never became ready: %v", err)
		}
	}
}

func notAfter(s Source) time.Time { return s.Status().NotAfter }

// TestRotationKeepsHandshakesWorkingThroughCAOutage runs mTLS handshakes
// between two rotating identities with 3-second certificates across many
// renewals, takes the CA down until the certificates expire, and brings it
// back. No handshake may fail while both certificates are valid; Ready must
// stay nil until expiry and then report the CA's error.
func TestRotationKeepsHandshakesWorkingThroughCAOutage(t *testing.T) {
	ca := testpki.New(t, "cluster.local")
	const ttl = 3 * time.Second
	newRot := func(id string) (*Rotator, *testIssuer) {
		iss := newTestIssuer(t, ca, id, ttl)
		r, err := NewRotator(iss,
			WithTTL(ttl),
			WithID(spiffeid.RequireFromString(id)),
			WithBackoff(20*time.Millisecond, 200*time.Millisecond),
			WithLogger(testLogger(t, nil)))
		if err != nil {
			t.Fatal(err)
		}
		runRotator(t, r)
		return r, iss
	}
	srv, srvCA := newRot(serverID)
	cli, cliCA := newRot(clientID)
	waitReady(t, srv, cli)

	server := startServer(t, ServerConfig(srv, authorizeID(clientID)))
	ccfg := ClientConfig(cli, authorizeID(serverID))

	handshakes := 0
	// handshake fails the test if a round trip fails while both
	// certificates in use were valid for its whole duration.
	handshake := func() error {
		validUntil := notAfter(srv)
		if na := notAfter(cli); na.Before(validUntil) {
			validUntil = na
		}
		_, err := server.roundTrip(ccfg)
		if err != nil && time.Now().Before(validUntil) {
			t.Fatalf("handshake %d failed while both certificates were valid (until %s): %v", handshakes, validUntil, err)
		}
		handshakes++
		return err
	}
	// readyOK fails the test if Ready reports an error before expiry.
	readyOK := func(r *Rotator) {
		na := notAfter(r)
		if err := r.Ready(); err != nil && time.Now().Before(na) {
			t.Fatalf("Ready() = %v before the certificate expired at %s", err, na)
		}
	}
	const pause = 5 * time.Millisecond

	// Phase 1: several renewals under load.
	startGen := min(srv.Generation(), cli.Generation())
	deadline := time.Now().Add(60 * time.Second)
	for min(srv.Generation(), cli.Generation()) < startGen+3 {
		if time.Now().After(deadline) {
			t.Fatalf("only reached generations %d/%d in 60s", srv.Generation(), cli.Generation())
		}
		// handshake itself fails the test if a valid pair was refused; a
		// refusal after expiry means this machine stalled past a renewal.
		if err := handshake(); err != nil {
			t.Logf("handshake after a certificate expired (machine stalled?): %v", err)
		}
		readyOK(srv)
		readyOK(cli)
		time.Sleep(pause)
	}
	t.Logf("phase 1: %d handshakes, generations %d/%d", handshakes, srv.Generation(), cli.Generation())

	// Phase 2: CA outage until both certificates expire.
	failuresBefore := testutil.ToFloat64(metrics.CertRotations.WithLabelValues("failure"))
	srvCA.down.Store(true)
	cliCA.down.Store(true)
	outageGen := [2]uint64{srv.Generation(), cli.Generation()}
	expiry := notAfter(srv)
	if na := notAfter(cli); na.After(expiry) {
		expiry = na
	}
	for i := 0; time.Now().Before(expiry); i++ {
		if i > 100000 {
			t.Fatal("outage loop did not end")
		}
		_ = handshake()
		readyOK(srv)
		readyOK(cli)
		time.Sleep(pause)
	}
	// Generation may have moved by at most one renewal that raced the outage.
	for _, r := range []*Rotator{srv, cli} {
		if r.Generation() > max(outageGen[0], outageGen[1])+1 {
			t.Fatalf("generation moved during the outage: %d", r.Generation())
		}
	}
	expiry = notAfter(srv)
	if na := notAfter(cli); na.After(expiry) {
		expiry = na
	}
	time.Sleep(time.Until(expiry) + 10*time.Millisecond)
	for _, r := range []*Rotator{srv, cli} {
		err := r.Ready()
		if err == nil {
			t.Fatal("Ready() = nil after the certificate expired during the outage")
		}
		if !errors.Is(err, ErrNoIdentity) || !strings.Contains(err.Error(), errOutage.Error()) || !strings.Contains(err.Error(), "expired") {
			t.Fatalf("Ready() = %q, want it to say the certificate expired and why (%q)", err, errOutage)
		}
		if st := r.Status(); !strings.Contains(st.LastError, errOutage.Error()) {
			t.Fatalf("Status().LastError = %q, want the CA error", st.LastError)
		}
	}
	if _, err := server.roundTrip(ccfg); err == nil {
		t.Fatal("handshake with expired certificates succeeded")
	}
	if got := testutil.ToFloat64(metrics.CertRotations.WithLabelValues("failure")); got <= failuresBefore {
		t.Fatalf("cert_rotations_total{result=failure} did not grow during the outage (%g → %g)", failuresBefore, got)
	}
	t.Logf("phase 2: %d handshakes in total, CA called %d/%d times", handshakes, srvCA.calls.Load(), cliCA.calls.Load())

	// Phase 3: the CA is back; retries recover and rotation continues.
	srvCA.down.Store(false)
	cliCA.down.Store(false)
	waitReady(t, srv, cli)
	recovered := min(srv.Generation(), cli.Generation())
	deadline = time.Now().Add(60 * time.Second)
	for min(srv.Generation(), cli.Generation()) < recovered+2 {
		if time.Now().After(deadline) {
			t.Fatalf("rotation did not continue after the outage: generations %d/%d", srv.Generation(), cli.Generation())
		}
		if err := handshake(); err != nil {
			t.Logf("handshake after a certificate expired (machine stalled?): %v", err)
		}
		time.Sleep(pause)
	}
	if got := testutil.ToFloat64(metrics.CertExpiry); got < float64(time.Now().Unix()) {
		t.Fatalf("cert_expiry_timestamp_seconds = %g, in the past", got)
	}
	t.Logf("phase 3: %d handshakes in total, generations %d/%d", handshakes, srv.Generation(), cli.Generation())
}

func TestRotatorRefusesBadIssuanceAndKeepsCurrent(t *testing.T) {
	ca := testpki.New(t, "cluster.local")
	other := testpki.New(t, "cluster.local")
	id := "spiffe://cluster.local/ns/default/sa/web"
	uri := func(s string) *url.URL { u, _ := url.Parse(s); return u }

	// answer signs the CSR's key (or another key), then lets bad tamper.
	type answer func(t *testing.T, csr *x509.CertificateRequest) *Issued
	signed := func(edit func(*x509.Certificate), issuer *testpki.CA) answer {
		return func(t *testing.T, csr *x509.CertificateRequest) *Issued {
			leaf := signLeaf(t, issuer, csr.PublicKey, func(c *x509.Certificate) {
				c.URIs = []*url.URL{uri(id)}
				if edit != nil {
					edit(c)
				}
			})
			return &Issued{Chain: []*x509.Certificate{leaf, issuer.Intermediate}, Roots: []*x509.Certificate{issuer.Root}}
		}
	}
	tests := []struct {
		name   string
		answer answer
		want   string
	}{
		{"certificate for another key", func(t *testing.T, _ *x509.CertificateRequest) *Issued {
			return signed(nil, ca)(t, &x509.CertificateRequest{PublicKey: testpki.NewKey(t).Public()})
		}, "does not match private key"},
		{"no spiffe id", signed(func(c *x509.Certificate) { c.URIs = nil }, ca), "no URI SAN"},
		{"two spiffe ids", signed(func(c *x509.Certificate) { c.URIs = append(c.URIs, uri(id+"2")) }, ca), "more than one URI SAN"},
		{"already expired", signed(func(c *x509.Certificate) {
			c.NotBefore = time.Now().Add(-2 * time.Hour)
			c.NotAfter = time.Now().Add(-time.Hour)
		}, ca), "expired at"},
		{"other trust domain", signed(func(c *x509.Certificate) { c.URIs = []*url.URL{uri("spiffe://evil.example/ns/a/sa/b")} }, ca), "not in trust domain"},
		{"chain does not verify against returned roots", func(t *testing.T, csr *x509.CertificateRequest) *Issued {
			is := signed(nil, other)(t, csr)
			is.Roots = []*x509.Certificate{ca.Root}
			return is
		}, "verify chain"},
		{"no roots", func(t *testing.T, csr *x509.CertificateRequest) *Issued {
			is := signed(nil, ca)(t, csr)
			is.Roots = nil
			return is
		}, "no root"},
		{"leaf as root", func(t *testing.T, csr *x509.CertificateRequest) *Issued {
			is := signed(nil, ca)(t, csr)
			is.Roots = []*x509.Certificate{is.Chain[0]}
			return is
		}, "not a CA certificate"},
		{"empty answer", func(*testing.T, *x509.CertificateRequest) *Issued { return &Issued{} }, "no certificate"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			bad := false
			iss := issuerFunc(func(_ context.Context, der []byte, _ time.Duration) (*Issued, error) {
				csr, err := x509.ParseCertificateRequest(der)
				if err != nil {
					return nil, err
				}
				if bad {
					return tt.answer(t, csr), nil
				}
				return signed(nil, ca)(t, csr), nil
			})
			r, err := NewRotator(iss, WithTrustDomain(spiffeid.RequireTrustDomainFromString("cluster.local")), WithLogger(testLogger(t, nil)))
			if err != nil {
				t.Fatal(err)
			}
			ctx := context.Background()

			// Before any certificate: refused, not ready, and Ready says why.
			bad = true
			err = r.Rotate(ctx)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("first Rotate = %v, want it to mention %q", err, tt.want)
			}
			if rerr := r.Ready(); rerr == nil || !strings.Contains(rerr.Error(), tt.want) || !errors.Is(rerr, ErrNoIdentity) {
				t.Fatalf("Ready() = %v, want ErrNoIdentity mentioning %q", rerr, tt.want)
			}
			if _, err := r.Certificate(); !errors.Is(err, ErrNoIdentity) {
				t.Fatalf("Certificate() before any issuance: err = %v", err)
			}

			// With a good certificate loaded, a bad answer keeps it.
			bad = false
			if err := r.Rotate(ctx); err != nil {
				t.Fatalf("good Rotate: %v", err)
			}
			good, _ := r.Certificate()
			gen := r.Generation()
			bad = true
			if err := r.Rotate(ctx); err == nil {
				t.Fatal("bad answer accepted")
			}
			if cur, _ := r.Certificate(); cur != good || r.Generation() != gen {
				t.Fatal("a refused answer replaced the current certificate")
			}
			if err := r.Ready(); err != nil {
				t.Fatalf("Ready() = %v with a valid certificate loaded", err)
			}
		})
	}
}

func TestRotatorSendsP256CSRWithIDHint(t *testing.T) {
	ca := testpki.New(t, "cluster.local")
	iss := newTestIssuer(t, ca, serverID, time.Hour)
	id := spiffeid.RequireFromString(serverID)
	r, err := NewRotator(iss, WithID(id), WithTTL(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Rotate(context.Background()); err != nil {
		t.Fatal(err)
	}
	csr := iss.lastCSR()
	pub, ok := csr.PublicKey.(*ecdsa.PublicKey)
	if !ok || pub.Curve != elliptic.P256() {
		t.Fatalf("CSR key is %T, want ECDSA P-256", csr.PublicKey)
	}
	if len(csr.URIs) != 1 || csr.URIs[0].String() != serverID {
		t.Fatalf("CSR URI SANs = %v, want [%s]", csr.URIs, serverID)
	}
	first, _ := r.GetX509SVID()
	if err := r.Rotate(context.Background()); err != nil {
		t.Fatal(err)
	}
	second, _ := r.GetX509SVID()
	if first.PrivateKey.Public().(*ecdsa.PublicKey).Equal(second.PrivateKey.Public()) {
		t.Fatal("renewal reused the private key")
	}
}

func TestRotatorLogsRotationWithoutKey(t *testing.T) {
	ca := testpki.New(t, "cluster.local")
	var logs syncBuffer
	r, err := NewRotator(newTestIssuer(t, ca, serverID, time.Hour), WithLogger(testLogger(t, &logs)))
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Rotate(context.Background()); err != nil {
		t.Fatal(err)
	}
	svid, _ := r.GetX509SVID()
	key := svid.PrivateKey.(*ecdsa.PrivateKey)
	out := logs.String()
	serial := fmt.Sprintf("%x", svid.Certificates[0].SerialNumber)
	if !strings.Contains(out, "certificate rotated") || !strings.Contains(out, serial) || !strings.Contains(out, "not_after") {
		t.Fatalf("rotation log lacks message, serial %s or not_after:\n%s", serial, out)
	}
	d, err := key.Bytes()
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	for _, secret := range []string{"PRIVATE KEY", fmt.Sprintf("%x", d), fmt.Sprintf("%X", d), base64.StdEncoding.EncodeToString(der)} {
		if strings.Contains(out, secret) {
			t.Fatalf("log contains private key material %q", secret)
		}
	}
}

// TestRotatorNewRootsApplyToNewHandshakes: when the CA starts answering
// from a new root (and the bundle file carries old and new during the
// rotation), peers of both roots are accepted without a restart, and
// dropping the old root from the file stops accepting its peers.
func TestRotatorNewRootsApplyToNewHandshakes(t *testing.T) {
	oldCA := testpki.New(t, "cluster.local")
	newCA := testpki.New(t, "cluster.local")
	dir := t.TempDir()
	bundleFile := filepath.Join(dir, "root-cert.pem")
	testpki.WriteFile(t, bundleFile, testpki.PEMCerts(oldCA.Root, newCA.Root))

	iss := newTestIssuer(t, oldCA, serverID, time.Hour)
	r, err := NewRotator(iss, WithBundleFile(bundleFile), WithPollInterval(time.Hour), WithLogger(testLogger(t, nil)))
	if err != nil {
		t.Fatal(err)
	}
	changed, unsubscribe := r.Subscribe()
	defer unsubscribe()
	runRotator(t, r)
	waitReady(t, r)

	server := startServer(t, ServerConfig(r, tlsconfig.AuthorizeMemberOf(spiffeid.RequireTrustDomainFromString("cluster.local"))))
	peer := func(ca *testpki.CA) error {
		svid := ca.Issue(t, clientID, time.Hour)
		cfg := ClientConfig(NewStatic(svid, oldCA.Bundle(), newCA.Bundle()), tlsconfig.AuthorizeAny())
		// The peer trusts both roots; only the server's bundle decides.
		cfg.VerifyConnection = nil
		_, err := server.roundTrip(cfg)
		return err
	}
	if err := peer(oldCA); err != nil {
		t.Fatalf("peer of the old root refused: %v", err)
	}
	if err := peer(newCA); err != nil {
		t.Fatalf("peer of the new root refused during root rotation: %v", err)
	}

	// The CA switches to the new root.
	iss.ca.Store(newCA)
	gen := r.Generation()
	if err := r.Rotate(context.Background()); err != nil {
		t.Fatal(err)
	}
	if r.Generation() <= gen {
		t.Fatal("generation did not change with the new root")
	}
	b, err := r.GetX509BundleForTrustDomain(spiffeid.RequireTrustDomainFromString("cluster.local"))
	if err != nil || !b.HasX509Authority(newCA.Root) {
		t.Fatalf("bundle lacks the new root (err %v)", err)
	}

	// The operator finishes the rotation: the file holds only the new root.
	drain(changed)
	gen = r.Generation()
	testpki.WriteFile(t, bundleFile, testpki.PEMCerts(newCA.Root))
	waitGeneration(t, r, changed, gen+1)
	if err := peer(oldCA); err == nil {
		t.Fatal("peer of the removed root still accepted")
	}
	if err := peer(newCA); err != nil {
		t.Fatalf("peer of the new root refused: %v", err)
	}

	// A broken bundle file keeps the last good roots.
	before := testutil.ToFloat64(metrics.ConfigReloads.WithLabelValues("bundle", "failure"))
	gen = r.Generation()
	if err := os.WriteFile(bundleFile, []byte("garbage"), 0o600); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for testutil.ToFloat64(metrics.ConfigReloads.WithLabelValues("bundle", "failure")) == before {
		if time.Now().After(deadline) {
			t.Fatal("broken bundle file not reported")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if r.Generation() != gen {
		t.Fatal("a broken bundle file changed the identity")
	}
	if err := peer(newCA); err != nil {
		t.Fatalf("peer refused after a broken bundle file: %v", err)
	}
}

func TestRotatorRefusesUnreadableBundleFileAtStart(t *testing.T) {
	path := filepath.Join(t.TempDir(), "missing.pem")
	_, err := NewRotator(issuerFunc(nil), WithBundleFile(path))
	if err == nil || !strings.Contains(err.Error(), path) {
		t.Fatalf("err = %v, want it to name %s", err, path)
	}
}

func TestSubscribeCoalescesAndUnsubscribeCloses(t *testing.T) {
	ca := testpki.New(t, "cluster.local")
	r, err := NewRotator(newTestIssuer(t, ca, serverID, time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	ch, unsubscribe := r.Subscribe()
	for range 3 {
		if err := r.Rotate(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	select {
	case <-ch:
	default:
		t.Fatal("no notification after rotations")
	}
	select {
	case <-ch:
		t.Fatal("notifications did not coalesce")
	default:
	}
	unsubscribe()
	unsubscribe() // idempotent
	if _, ok := <-ch; ok {
		t.Fatal("channel still open after unsubscribe")
	}
	if err := r.Rotate(context.Background()); err != nil { // must not panic on a closed channel
		t.Fatal(err)
	}
}

func drain(ch <-chan struct{}) {
	select {
	case <-ch:
	default:
	}
}

// waitGeneration waits for notifications until src reaches gen.
func waitGeneration(t *testing.T, src Source, ch <-chan struct{}, gen uint64) {
	t.Helper()
	timeout := time.After(30 * time.Second)
	for src.Generation() < gen {
		select {
		case <-ch:
		case <-timeout:
			t.Fatalf("generation %d never reached (at %d)", gen, src.Generation())
		}
	}
}
