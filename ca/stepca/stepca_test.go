package stepca_test

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/meshproxy/meshproxy/ca"
	"github.com/meshproxy/meshproxy/ca/authn"
	"github.com/meshproxy/meshproxy/ca/catest"
	"github.com/meshproxy/meshproxy/ca/stepca"
	"github.com/meshproxy/meshproxy/ca/stepca/stepcatest"
	"github.com/meshproxy/meshproxy/internal/testpki"
	"github.com/meshproxy/meshproxy/tlsmgr"
	"github.com/meshproxy/meshproxy/tlsmgr/caclient"
)

const (
	clientID = "spiffe://cluster.local/ns/demo/sa/client"
	serverID = "spiffe://cluster.local/ns/demo/sa/server"
)

func quiet() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func skipShort(t *testing.T) {
	t.Helper()
	if testing.Short() {
		t.Skip("real step-ca tests need the step-ca build; skipped with -short")
	}
}

// meshCA is a meshproxy CA server signing through a Signer, on loopback,
// with bearer tokens for the client and the server identity.
type meshCA struct {
	addr  string
	dir   string
	roots []*x509.Certificate // the backend's roots: CA TLS and trust bundle
}

func startMeshCA(t *testing.T, s ca.Signer) *meshCA {
	t.Helper()
	a, err := ca.NewFromSigner(s)
	if err != nil {
		t.Fatal(err)
	}
	if a.TrustDomain().Name() != "cluster.local" {
		t.Fatalf("trust domain = %q, want it from the root's URI SAN", a.TrustDomain().Name())
	}
	dir := t.TempDir()
	tokens := filepath.Join(dir, "tokens")
	if err := os.WriteFile(tokens, []byte("client-token "+clientID+"\nserver-token "+serverID+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tok := range []string{"client", "server"} {
		if err := os.WriteFile(filepath.Join(dir, tok+".token"), []byte(tok+"-token\n"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	toks, err := authn.NewTokens(tokens, authn.WithLogger(quiet()))
	if err != nil {
		t.Fatal(err)
	}
	srv, err := ca.NewServer(a, []authn.Authenticator{toks}, ca.WithLogger(quiet()))
	if err != nil {
		t.Fatal(err)
	}
	return &meshCA{addr: catest.Serve(t, srv, a.Roots(), 60*time.Second), dir: dir, roots: a.Roots()}
}

// sidecar is what `meshproxy run --ca-addr` builds: a Rotator requesting
// certificates through the gRPC CA client.
func (m *meshCA) sidecar(t *testing.T, name string) (*tlsmgr.Rotator, error) {
	t.Helper()
	client, err := caclient.New(m.addr, caclient.WithRoots(m.roots...), caclient.WithServerName("localhost"),
		caclient.WithTokenFile(filepath.Join(m.dir, name+".token")))
	if err != nil {
		t.Fatal(err)
	}
	r, err := tlsmgr.NewRotator(client, tlsmgr.WithLogger(quiet()), tlsmgr.WithBackoff(100*time.Millisecond, time.Second))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	return r, r.Rotate(ctx)
}

func newSigner(t *testing.T, srv *stepcatest.Server, key *jose.JSONWebKey) *stepca.Signer {
	t.Helper()
	roots := readRoots(t, srv.RootFile)
	s, err := stepca.New(srv.URL, roots, srv.Provisioner, key, stepca.WithLogger(quiet()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	return s
}

func readRoots(t *testing.T, path string) []*x509.Certificate {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	roots, err := tlsmgr.ParseCertificatesPEM(data)
	if err != nil {
		t.Fatal(err)
	}
	return roots
}

// TestStepCAIssuesWorkingSVIDs runs the whole path for real: sidecars ask
// the meshproxy CA, which authenticates them and has step-ca sign; the two
// identities then talk mutual TLS.
func TestStepCAIssuesWorkingSVIDs(t *testing.T) {
	skipShort(t)
	srv := stepcatest.Start(t, "cluster.local")
	key, err := stepca.LoadProvisionerKey(srv.KeyFile, srv.PasswordFile)
	if err != nil {
		t.Fatal(err)
	}
	mesh := startMeshCA(t, newSigner(t, srv, key))

	client, err := mesh.sidecar(t, "client")
	if err != nil {
		t.Fatalf("client sidecar: %v\nstep-ca log:\n%s", err, readTail(srv.LogFile))
	}
	server, err := mesh.sidecar(t, "server")
	if err != nil {
		t.Fatalf("server sidecar: %v", err)
	}

	st := client.Status()
	if st.ID.String() != clientID {
		t.Fatalf("client SVID is for %s, want %s", st.ID, clientID)
	}
	if len(st.Chain) != 2 || !st.Chain[1].Equal(srv.PKI.Intermediate) {
		t.Fatalf("client chain has %d certificates, want the leaf and step-ca's intermediate", len(st.Chain))
	}
	leaf := st.Chain[0]
	if len(leaf.URIs) != 1 || len(leaf.DNSNames) != 0 || len(leaf.IPAddresses) != 0 || leaf.IsCA {
		t.Fatalf("leaf SANs: URIs %v DNS %v IPs %v, CA %v", leaf.URIs, leaf.DNSNames, leaf.IPAddresses, leaf.IsCA)
	}
	if leaf.CheckSignatureFrom(srv.PKI.Intermediate) != nil {
		t.Fatal("leaf is not signed by step-ca's intermediate")
	}
	if life := time.Until(leaf.NotAfter); life < 23*time.Hour || life > 24*time.Hour+time.Minute {
		t.Errorf("leaf lives %s, want the default 24h", life)
	}
	if b := st.Bundles; len(b) != 1 || len(b[0].X509Authorities()) != 1 || !b[0].X509Authorities()[0].Equal(srv.PKI.Root) {
		t.Fatalf("trust bundle is not step-ca's root: %v", b)
	}

	// Mutual TLS between the two identities, each checking the other's ID.
	cid, sid := spiffeid.RequireFromString(clientID), spiffeid.RequireFromString(serverID)
	lis, err := tls.Listen("tcp", "127.0.0.1:0", tlsmgr.ServerConfig(server, tlsconfig.AuthorizeID(cid)))
	if err != nil {
		t.Fatal(err)
	}
	defer lis.Close()
	peerSeen := make(chan string, 1)
	go func() {
		c, err := lis.Accept()
		if err != nil {
			peerSeen <- "accept: " + err.Error()
			return
		}
		defer c.Close()
		tc := c.(*tls.Conn)
		_ = tc.SetDeadline(time.Now().Add(30 * time.Second))
		if err := tc.Handshake(); err != nil {
			peerSeen <- "handshake: " + err.Error()
			return
		}
		id, err := tlsmgr.PeerID(tc.ConnectionState())
		if err != nil {
			peerSeen <- err.Error()
			return
		}
		line, _ := bufio.NewReader(tc).ReadString('\n')
		_, _ = tc.Write([]byte("pong " + line))
		peerSeen <- id.String()
	}()
	conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 30 * time.Second}, "tcp", lis.Addr().String(),
		tlsmgr.ClientConfig(client, tlsconfig.AuthorizeID(sid)))
	if err != nil {
		t.Fatalf("mTLS dial: %v", err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(30 * time.Second))
	if id, err := tlsmgr.PeerID(conn.ConnectionState()); err != nil || id != sid {
		t.Fatalf("server identity = %v, %v; want %s", id, err, sid)
	}
	if _, err := conn.Write([]byte("ping\n")); err != nil {
		t.Fatal(err)
	}
	reply, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil || reply != "pong ping\n" {
		t.Fatalf("reply %q, %v", reply, err)
	}
	if got := <-peerSeen; got != clientID {
		t.Fatalf("server saw peer %q, want %s", got, clientID)
	}

	// Renewal goes through step-ca again and yields a fresh certificate.
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := client.Rotate(ctx); err != nil {
		t.Fatalf("renewal: %v", err)
	}
	if client.Status().Serial == st.Serial {
		t.Error("renewal returned the same certificate")
	}
}

// TestStepCAWrongProvisionerKeyIsABackendError: step-ca refuses a token
// signed by another key; the error says it was step-ca that refused.
func TestStepCAWrongProvisionerKeyIsABackendError(t *testing.T) {
	skipShort(t)
	srv := stepcatest.Start(t, "cluster.local")
	other := &jose.JSONWebKey{Key: testpki.NewKey(t), KeyID: srv.Key.KeyID, Algorithm: string(jose.ES256)}
	a, err := ca.NewFromSigner(newSigner(t, srv, other))
	if err != nil {
		t.Fatal(err)
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, testpki.NewKey(t))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	_, err = a.SignChain(ctx, csr, spiffeid.RequireFromString(clientID), time.Hour)
	if !errors.Is(err, ca.ErrBackendRefused) || !strings.Contains(err.Error(), "401") {
		t.Fatalf("err = %v, want step-ca's 401 as ErrBackendRefused", err)
	}
}

// TestStepCAUnreachableIsUnavailable: a step-ca that is down makes the CA
// answer Unavailable, so sidecars keep retrying.
func TestStepCAUnreachableIsUnavailable(t *testing.T) {
	skipShort(t)
	srv := stepcatest.Start(t, "cluster.local")
	key, err := stepca.LoadProvisionerKey(srv.KeyFile, srv.PasswordFile)
	if err != nil {
		t.Fatal(err)
	}
	s := newSigner(t, srv, key)
	mesh := startMeshCA(t, s) // the serving certificate comes from step-ca
	s.Close()                 // no idle connection keeps step-ca's shutdown waiting
	srv.Stop(t)
	_, err = mesh.sidecar(t, "client")
	if code := status.Code(err); code != codes.Unavailable {
		t.Fatalf("code = %v, want Unavailable: %v", code, err)
	}
}

func readTail(path string) string {
	data, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	if len(data) > 4000 {
		data = data[len(data)-4000:]
	}
	return string(data)
}
