package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"io"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	pb "istio.io/api/security/v1alpha1"

	"github.com/meshproxy/meshproxy/ca/awspca/awspcatest"
	"github.com/meshproxy/meshproxy/ca/stepca/stepcatest"
	"github.com/meshproxy/meshproxy/ca/vault/vaulttest"
	"github.com/meshproxy/meshproxy/internal/testpki"
	"github.com/meshproxy/meshproxy/tlsmgr"
	"github.com/meshproxy/meshproxy/tlsmgr/caclient"
)

func TestCAServeSignerUsageErrorsNameTheFlag(t *testing.T) {
	dir := t.TempDir()
	f := filepath.Join(dir, "file")
	caWriteFile(t, f, "x")
	pki := testpki.New(t, "cluster.local")
	rootFile, keyFile := filepath.Join(dir, "root.pem"), filepath.Join(dir, "key.json")
	caWriteFile(t, rootFile, string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: pki.Root.Raw})))
	jwk, err := json.Marshal(&jose.JSONWebKey{Key: testpki.NewKey(t)})
	if err != nil {
		t.Fatal(err)
	}
	caWriteFile(t, keyFile, string(jwk))
	stepcaOK := []string{"--signer", "stepca", "--stepca-url", "https://ca:9000", "--stepca-root", f, "--stepca-provisioner", "p", "--stepca-provisioner-key", f}
	vaultOK := []string{"--signer", "vault", "--vault-addr", "https://vault:8200", "--vault-token-file", f, "--vault-role", "r"}
	tests := []struct {
		name string
		args []string
		flag string
	}{
		{"unknown signer", []string{"--signer", "openssl"}, "--signer"},
		{"builtin without dir", []string{"--signer", "builtin"}, "--dir"},
		{"stepca flags with builtin", []string{"--dir", dir, "--stepca-url", "https://ca:9000"}, "--stepca-url"},
		{"vault flags with stepca", append(stepcaOK, "--vault-role", "r"), "--vault-role"},
		{"stepca without url", []string{"--signer", "stepca"}, "--stepca-url"},
		{"stepca without root", []string{"--signer", "stepca", "--stepca-url", "https://ca:9000"}, "--stepca-root"},
		{"stepca without provisioner", stepcaOK[:6], "--stepca-provisioner"},
		{"stepca without key", stepcaOK[:8], "--stepca-provisioner-key"},
		{"stepca with dir", append(stepcaOK, "--dir", dir), "--dir"},
		{"stepca plain http", []string{"--signer", "stepca", "--stepca-url", "http://ca:9000", "--stepca-root", rootFile,
			"--stepca-provisioner", "p", "--stepca-provisioner-key", keyFile}, "--stepca-url"},
		{"vault without addr", []string{"--signer", "vault"}, "--vault-addr"},
		{"vault without token file", vaultOK[:4], "--vault-token-file"},
		{"vault without role", vaultOK[:6], "--vault-role"},
		{"vault empty mount", append(vaultOK, "--vault-mount", ""), "--vault-mount"},
		{"vault with dir", append(vaultOK, "--dir", dir), "--dir"},
		{"awspca flags with vault", append(vaultOK, "--awspca-region", "eu-west-1"), "--awspca-region"},
		{"awspca without arn", []string{"--signer", "awspca"}, "--awspca-ca-arn"},
		{"awspca empty template", []string{"--signer", "awspca", "--awspca-ca-arn", "arn:aws:acm-pca:eu-west-1:1:certificate-authority/x",
			"--awspca-template-arn", ""}, "--awspca-template-arn"},
		{"googlecas without pool", []string{"--signer", "googlecas"}, "--googlecas-pool"},
		{"googlecas flags with awspca", []string{"--signer", "awspca", "--awspca-ca-arn", "arn:aws:acm-pca:eu-west-1:1:certificate-authority/x",
			"--googlecas-ca", "ca-1"}, "--googlecas-ca"},
		{"googlecas bad pool", []string{"--signer", "googlecas", "--googlecas-pool", "mesh"}, "--googlecas-pool"},
		{"certmanager without issuer", []string{"--signer", "certmanager"}, "--certmanager-issuer"},
		{"certmanager without root", []string{"--signer", "certmanager", "--certmanager-issuer", "mesh-ca"}, "--certmanager-root"},
		{"certmanager flags with builtin", []string{"--dir", dir, "--certmanager-approve"}, "--certmanager-approve"},
		{"awspca with dir", []string{"--signer", "awspca", "--awspca-ca-arn", "arn:aws:acm-pca:eu-west-1:1:certificate-authority/x", "--dir", dir}, "--dir"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			args := append([]string{"ca", "serve", "--auth", "token", "--tokens", f, "--listen", "127.0.0.1:0", "--metrics", ""}, tt.args...)
			code, out := caExec(t, args...)
			if code != 2 || !strings.Contains(out, tt.flag) {
				t.Fatalf("exit %d, want 2 naming %s; output: %s", code, tt.flag, out)
			}
		})
	}
}

func TestCAServeSignerRuntimeErrorsNameTheFlag(t *testing.T) {
	dir := t.TempDir()
	tokens := filepath.Join(dir, "tokens")
	caWriteFile(t, tokens, "t spiffe://cluster.local/a\n")
	notPEM := filepath.Join(dir, "not-pem")
	caWriteFile(t, notPEM, "hello")
	code, out := caExec(t, "ca", "serve", "--auth", "token", "--tokens", tokens, "--listen", "127.0.0.1:0", "--metrics", "",
		"--signer", "stepca", "--stepca-url", "https://127.0.0.1:1", "--stepca-root", notPEM, "--stepca-provisioner", "p", "--stepca-provisioner-key", notPEM)
	if code != 1 || !strings.Contains(out, "--stepca-root") {
		t.Fatalf("exit %d, want 1 naming --stepca-root: %s", code, out)
	}
}

// runCAServe runs `meshproxy ca serve` in-process with args until the test
// ends and returns its address.
func runCAServe(t *testing.T, tokens string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	root := newRootCmd()
	var out caSyncBuffer
	root.SetOut(&out)
	root.SetErr(&out)
	root.SetArgs(append([]string{"ca", "serve", "--listen", "127.0.0.1:0", "--metrics", "", "--auth", "token", "--tokens", tokens}, args...))
	done := make(chan error, 1)
	go func() { done <- root.ExecuteContext(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("serve returned %v after cancel", err)
			}
		case <-time.After(30 * time.Second):
			t.Error("serve did not stop after cancel")
		}
	})
	return caWaitLog(t, &out, done, `msg="ca serving" addr=(\S+)`)
}

// serveAndIssue runs `meshproxy ca serve` in-process with args, asks it for
// a certificate as client-token and returns the response chain.
func serveAndIssue(t *testing.T, tokens string, args ...string) [][]*x509.Certificate {
	t.Helper()
	return issueFrom(t, runCAServe(t, tokens, args...), args)
}

func issueFrom(t *testing.T, addr string, args []string) [][]*x509.Certificate {
	t.Helper()
	var rootFile string
	for i, a := range args {
		if strings.HasPrefix(a, "--") && strings.HasSuffix(a, "-root") {
			rootFile = args[i+1]
		}
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caReadFile(t, rootFile)) {
		t.Fatal("no root")
	}
	cc, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{RootCAs: pool, ServerName: "localhost"})))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	resp, err := pb.NewIstioCertificateServiceClient(cc).CreateCertificate(
		metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer client-token"),
		&pb.IstioCertificateRequest{Csr: string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})), ValidityDuration: 3600})
	if err != nil {
		t.Fatal(err)
	}
	var chain [][]*x509.Certificate
	for _, p := range resp.CertChain {
		var certs []*x509.Certificate
		for rest := []byte(p); ; {
			var b *pem.Block
			if b, rest = pem.Decode(rest); b == nil {
				break
			}
			c, err := x509.ParseCertificate(b.Bytes)
			if err != nil {
				t.Fatal(err)
			}
			certs = append(certs, c)
		}
		chain = append(chain, certs)
	}
	if len(chain) != 3 {
		t.Fatalf("cert_chain has %d elements, want leaf, intermediate, root", len(chain))
	}
	if id, err := x509svid.IDFromCert(chain[0][0]); err != nil || id.String() != "spiffe://cluster.local/ns/demo/sa/client" {
		t.Fatalf("identity = %v, %v", id, err)
	}
	return chain
}

// TestCAServeSignerVault: `ca serve --signer vault` against a stand-in
// Vault (Vault itself cannot run here), TLS trusted through VAULT_CACERT.
func TestCAServeSignerVault(t *testing.T) {
	dir := t.TempDir()
	pki := testpki.NewWithTTL(t, "cluster.local", 7*24*time.Hour)
	v := vaulttest.Start(t, pki, "hvs.cmd-test")
	caWriteFile(t, filepath.Join(dir, "vault-ca.pem"), string(v.CAPEM))
	t.Setenv("VAULT_CACERT", filepath.Join(dir, "vault-ca.pem"))
	t.Setenv("VAULT_TOKEN", "hvs.ignored") // only --vault-token-file counts
	caWriteFile(t, filepath.Join(dir, "token"), "hvs.cmd-test\n")
	caWriteFile(t, filepath.Join(dir, "root.pem"), string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: pki.Root.Raw})))
	tokens := filepath.Join(dir, "tokens")
	caWriteFile(t, tokens, "client-token spiffe://cluster.local/ns/demo/sa/client\n")

	chain := serveAndIssue(t, tokens, "--signer", "vault", "--vault-addr", v.URL, "--vault-token-file", filepath.Join(dir, "token"),
		"--vault-role", v.Role, "--vault-root", filepath.Join(dir, "root.pem"))
	if !chain[1][0].Equal(pki.Intermediate) || !chain[2][0].Equal(pki.Root) {
		t.Fatal("chain is not Vault's intermediate and root")
	}
	for _, c := range v.Signed() {
		if c.Token != "hvs.cmd-test" {
			t.Fatalf("Vault got token %q, want the token file's", c.Token)
		}
	}
}

// TestCAServeSignerAWSPCA: `ca serve --signer awspca` against a stand-in
// private CA speaking ACM PCA's API, with credentials from the AWS SDK's
// default chain (here the AWS_* variables) and its TLS trusted through
// AWS_CA_BUNDLE.
func TestCAServeSignerAWSPCA(t *testing.T) {
	dir := t.TempDir()
	pki := testpki.NewWithTTL(t, "cluster.local", 7*24*time.Hour)
	pca := awspcatest.Start(t, pki)
	tokens := filepath.Join(dir, "tokens")
	caWriteFile(t, tokens, "client-token spiffe://cluster.local/ns/demo/sa/client\n")
	caWriteFile(t, filepath.Join(dir, "root.pem"), string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: pki.Root.Raw})))
	chain := serveAndIssue(t, tokens, "--signer", "awspca", "--awspca-ca-arn", pca.CAARN, "--awspca-endpoint", pca.URL,
		"--awspca-root", filepath.Join(dir, "root.pem"))
	if !chain[1][0].Equal(pki.Intermediate) || !chain[2][0].Equal(pki.Root) {
		t.Fatal("chain is not the private CA and its root")
	}
	if n := len(pca.Calls("IssueCertificate")); n != 2 {
		t.Fatalf("IssueCertificate called %d times, want 2 (the CA's serving certificate, the client's)", n)
	}
}

// TestCAServeSignerStepCA: `ca serve --signer stepca` against a real
// step-ca, with the provisioner key encrypted as in ca.json; two sidecars'
// Rotators get their SVIDs through it and talk mutual TLS.
func TestCAServeSignerStepCA(t *testing.T) {
	if testing.Short() {
		t.Skip("real step-ca tests need the step-ca build; skipped with -short")
	}
	srv := stepcatest.Start(t, "cluster.local")
	dir := t.TempDir()
	tokens := filepath.Join(dir, "tokens")
	caWriteFile(t, tokens, "client-token spiffe://cluster.local/ns/demo/sa/client\nserver-token spiffe://cluster.local/ns/demo/sa/server\n")
	args := []string{"--signer", "stepca", "--stepca-url", srv.URL, "--stepca-root", srv.RootFile,
		"--stepca-provisioner", srv.Provisioner, "--stepca-provisioner-key", srv.KeyFile, "--stepca-provisioner-password-file", srv.PasswordFile}
	addr := runCAServe(t, tokens, args...)
	chain := issueFrom(t, addr, args)
	if !chain[1][0].Equal(srv.PKI.Intermediate) || !chain[2][0].Equal(srv.PKI.Root) {
		t.Fatal("chain is not step-ca's intermediate and root")
	}

	sidecar := func(name string) *tlsmgr.Rotator {
		t.Helper()
		caWriteFile(t, filepath.Join(dir, name+".token"), name+"-token")
		client, err := caclient.New(addr, caclient.WithRootFile(srv.RootFile), caclient.WithServerName("localhost"),
			caclient.WithTokenFile(filepath.Join(dir, name+".token")))
		if err != nil {
			t.Fatal(err)
		}
		r, err := tlsmgr.NewRotator(client)
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		if err := r.Rotate(ctx); err != nil {
			t.Fatalf("%s sidecar: %v", name, err)
		}
		return r
	}
	client, server := sidecar("client"), sidecar("server")
	cid := spiffeid.RequireFromString("spiffe://cluster.local/ns/demo/sa/client")
	sid := spiffeid.RequireFromString("spiffe://cluster.local/ns/demo/sa/server")
	lis, err := tls.Listen("tcp", "127.0.0.1:0", tlsmgr.ServerConfig(server, tlsconfig.AuthorizeID(cid)))
	if err != nil {
		t.Fatal(err)
	}
	defer lis.Close()
	served := make(chan error, 1)
	go func() {
		c, err := lis.Accept()
		if err != nil {
			served <- err
			return
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(30 * time.Second))
		_, err = io.Copy(c, io.LimitReader(c, 5))
		served <- err
	}()
	conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 30 * time.Second}, "tcp", lis.Addr().String(), tlsmgr.ClientConfig(client, tlsconfig.AuthorizeID(sid)))
	if err != nil {
		t.Fatalf("mutual TLS between the step-ca identities: %v", err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := conn.Write([]byte("hello")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 5)
	if _, err := io.ReadFull(conn, buf); err != nil || string(buf) != "hello" {
		t.Fatalf("echo %q, %v", buf, err)
	}
	if err := <-served; err != nil {
		t.Fatal(err)
	}
}
