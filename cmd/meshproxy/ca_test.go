package main

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	pb "istio.io/api/security/v1alpha1"
)

// caSyncBuffer collects a command's output while the test reads it.
type caSyncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *caSyncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *caSyncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// caExec runs the meshproxy command line in-process and returns its exit
// status and output, as main would.
func caExec(t *testing.T, args ...string) (int, string) {
	t.Helper()
	root := newRootCmd()
	var out caSyncBuffer
	root.SetOut(&out)
	root.SetErr(&out)
	root.SetArgs(args)
	err := root.ExecuteContext(context.Background())
	code := 0
	if err != nil {
		code = 1
		var ue usageError
		if errors.As(err, &ue) {
			code = 2
		}
		out.Write([]byte("meshproxy: " + err.Error() + "\n"))
	}
	return code, out.String()
}

func TestCAInitWritesLayoutAndRefusesOverwrite(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "cacerts")
	code, out := caExec(t, "ca", "init", "--dir", dir, "--trust-domain", "example.org", "--key-type", "ecdsa-p384", "--ca-ttl", "720h")
	if code != 0 {
		t.Fatalf("init exit %d: %s", code, out)
	}
	if !strings.Contains(out, "example.org") {
		t.Errorf("init output does not name the trust domain: %s", out)
	}
	for _, f := range []string{"root-cert.pem", "ca-cert.pem", "ca-key.pem", "cert-chain.pem"} {
		fi, err := os.Stat(filepath.Join(dir, f))
		if err != nil {
			t.Fatal(err)
		}
		if f == "ca-key.pem" && fi.Mode().Perm() != 0o600 {
			t.Errorf("ca-key.pem mode %v", fi.Mode().Perm())
		}
	}
	root := caReadFile(t, filepath.Join(dir, "root-cert.pem"))

	code, out = caExec(t, "ca", "init", "--dir", dir, "--trust-domain", "example.org")
	if code != 1 || !strings.Contains(out, "--force") {
		t.Fatalf("second init: exit %d, want 1 with a hint at --force: %s", code, out)
	}
	if !bytes.Equal(root, caReadFile(t, filepath.Join(dir, "root-cert.pem"))) {
		t.Fatal("refused init changed root-cert.pem")
	}
	if code, out = caExec(t, "ca", "init", "--dir", dir, "--trust-domain", "example.org", "--force"); code != 0 {
		t.Fatalf("init --force: exit %d: %s", code, out)
	}
	if bytes.Equal(root, caReadFile(t, filepath.Join(dir, "root-cert.pem"))) {
		t.Fatal("init --force kept the old root")
	}
}

func TestCAInitFlagsFromEnvironment(t *testing.T) {
	dir := t.TempDir()
	t.Setenv("MESHPROXY_DIR", dir)
	t.Setenv("MESHPROXY_TRUST_DOMAIN", "env.example")
	if code, out := caExec(t, "ca", "init"); code != 0 {
		t.Fatalf("init from env: exit %d: %s", code, out)
	}
	block, _ := pem.Decode(caReadFile(t, filepath.Join(dir, "root-cert.pem")))
	root, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	if len(root.URIs) != 1 || root.URIs[0].String() != "spiffe://env.example" {
		t.Fatalf("root URIs = %v, want spiffe://env.example", root.URIs)
	}
}

func TestCAUsageErrorsNameTheFlag(t *testing.T) {
	dir := t.TempDir()
	tokens := filepath.Join(dir, "tokens")
	caWriteFile(t, tokens, "t spiffe://cluster.local/a\n")
	tests := []struct {
		name string
		args []string
		flag string
	}{
		{"init without dir", []string{"ca", "init", "--trust-domain", "td"}, "--dir"},
		{"init without trust domain", []string{"ca", "init", "--dir", dir}, "--trust-domain"},
		{"init bad trust domain", []string{"ca", "init", "--dir", dir, "--trust-domain", "Bad Domain"}, "--trust-domain"},
		{"init bad key type", []string{"ca", "init", "--dir", dir, "--trust-domain", "td", "--key-type", "dsa"}, "--key-type"},
		{"init ca outliving root", []string{"ca", "init", "--dir", dir, "--trust-domain", "td", "--root-ttl", "1h", "--ca-ttl", "2h"}, "--ca-ttl"},
		{"init unparsable duration", []string{"ca", "init", "--dir", dir, "--trust-domain", "td", "--root-ttl", "ten years"}, "root-ttl"},
		{"serve without dir", []string{"ca", "serve"}, "--dir"},
		{"serve unknown auth", []string{"ca", "serve", "--dir", dir, "--auth", "password"}, "--auth"},
		{"serve token without file", []string{"ca", "serve", "--dir", dir, "--auth", "token"}, "--tokens"},
		{"serve tokens without token auth", []string{"ca", "serve", "--dir", dir, "--tokens", tokens}, "--tokens"},
		{"serve jwks without issuer", []string{"ca", "serve", "--dir", dir, "--auth", "jwks", "--jwks", tokens}, "--jwt-issuer"},
		{"serve default over max", []string{"ca", "serve", "--dir", dir, "--auth", "token", "--tokens", tokens, "--default-ttl", "48h", "--max-ttl", "24h"}, "--default-ttl"},
		{"serve bad trust domain", []string{"ca", "serve", "--dir", dir, "--auth", "token", "--tokens", tokens, "--trust-domain", "a/b"}, "--trust-domain"},
		{"serve stray argument", []string{"ca", "serve", "extra"}, "extra"},
		{"serve bad log level", []string{"ca", "serve", "--dir", dir, "--auth", "token", "--tokens", tokens, "--log-level", "loud"}, "--log-level"},
		{"serve bad log format", []string{"ca", "serve", "--dir", dir, "--auth", "token", "--tokens", tokens, "--log-format", "xml"}, "--log-format"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			code, out := caExec(t, tt.args...)
			if code != 2 || !strings.Contains(out, tt.flag) {
				t.Fatalf("exit %d, want 2 naming %s; output: %s", code, tt.flag, out)
			}
		})
	}
}

func TestCAServeRuntimeErrorsExitOne(t *testing.T) {
	dir := t.TempDir()
	tokens := filepath.Join(dir, "tokens")
	caWriteFile(t, tokens, "t spiffe://cluster.local/a\n")
	// No CA in the directory: a runtime failure naming the file.
	code, out := caExec(t, "ca", "serve", "--dir", dir, "--auth", "token", "--tokens", tokens, "--listen", "127.0.0.1:0", "--metrics", "")
	if code != 1 || !strings.Contains(out, "root-cert.pem") {
		t.Fatalf("exit %d, want 1 naming root-cert.pem: %s", code, out)
	}
}

// ca serve follows the conventions of run and gateway: --metrics off
// disables the endpoint, --log-format json gives JSON lines.
func TestCAServeMetricsOffAndJSONLogs(t *testing.T) {
	dir := t.TempDir()
	if code, out := caExec(t, "ca", "init", "--dir", dir, "--trust-domain", "cluster.local"); code != 0 {
		t.Fatalf("init: exit %d: %s", code, out)
	}
	tokens := filepath.Join(dir, "tokens")
	caWriteFile(t, tokens, "client-token spiffe://cluster.local/ns/demo/sa/client\n")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	root := newRootCmd()
	var out caSyncBuffer
	root.SetOut(&out)
	root.SetErr(&out)
	root.SetArgs([]string{"ca", "serve", "--dir", dir, "--listen", "127.0.0.1:0", "--metrics", "off",
		"--auth", "token", "--tokens", tokens, "--log-format", "json"})
	done := make(chan error, 1)
	go func() { done <- root.ExecuteContext(ctx) }()
	caWaitLog(t, &out, done, `"msg":"ca serving","addr":"([^"]+)"`)
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("serve returned %v after cancel, want nil", err)
	}
	if log := out.String(); strings.Contains(log, "metrics serving") {
		t.Errorf("--metrics off still served metrics:\n%s", log)
	}
}

func TestCAInitThenServeIssuesCertificates(t *testing.T) {
	dir := t.TempDir()
	if code, out := caExec(t, "ca", "init", "--dir", dir, "--trust-domain", "cluster.local"); code != 0 {
		t.Fatalf("init: exit %d: %s", code, out)
	}
	tokens := filepath.Join(dir, "tokens")
	caWriteFile(t, tokens, "# demo tokens\nclient-token spiffe://cluster.local/ns/demo/sa/client\n")

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	root := newRootCmd()
	var out caSyncBuffer
	root.SetOut(&out)
	root.SetErr(&out)
	root.SetArgs([]string{"ca", "serve", "--dir", dir, "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0",
		"--auth", "token", "--tokens", tokens, "--serving-dns", "ca.test", "--max-ttl", "48h"})
	done := make(chan error, 1)
	go func() { done <- root.ExecuteContext(ctx) }()

	caAddr := caWaitLog(t, &out, done, `msg="ca serving" addr=(\S+)`)
	metricsAddr := caWaitLog(t, &out, done, `msg="metrics serving" addr=(\S+)`)

	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caReadFile(t, filepath.Join(dir, "root-cert.pem"))) {
		t.Fatal("no root")
	}
	cc, err := grpc.NewClient(caAddr, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{RootCAs: pool, ServerName: "ca.test"})))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	client := pb.NewIstioCertificateServiceClient(cc)
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		t.Fatal(err)
	}
	csr := string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}))
	rpcCtx, rpcCancel := context.WithTimeout(ctx, 30*time.Second)
	defer rpcCancel()

	resp, err := client.CreateCertificate(metadata.AppendToOutgoingContext(rpcCtx, "authorization", "Bearer client-token"),
		&pb.IstioCertificateRequest{Csr: csr, ValidityDuration: 3600})
	if err != nil {
		t.Fatal(err)
	}
	block, _ := pem.Decode([]byte(resp.CertChain[0]))
	leaf, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	if id, err := x509svid.IDFromCert(leaf); err != nil || id.String() != "spiffe://cluster.local/ns/demo/sa/client" {
		t.Fatalf("identity = %v, %v", id, err)
	}
	_, err = client.CreateCertificate(rpcCtx, &pb.IstioCertificateRequest{Csr: csr})
	if status.Code(err) != codes.Unauthenticated {
		t.Fatalf("without token: %v, want Unauthenticated", err)
	}
	_, err = client.CreateCertificate(metadata.AppendToOutgoingContext(rpcCtx, "authorization", "Bearer client-token"),
		&pb.IstioCertificateRequest{Csr: csr, ValidityDuration: 49 * 3600})
	if status.Code(err) != codes.InvalidArgument {
		t.Fatalf("over --max-ttl: %v, want InvalidArgument", err)
	}

	resp2, err := http.Get("http://" + metricsAddr + "/stats/prometheus")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp2.Body)
	_ = resp2.Body.Close()
	for _, want := range []string{"meshproxy_ca_certs_issued_total", `meshproxy_ca_csr_errors_total{reason="unauthenticated"}`, "meshproxy_ca_root_expiry_timestamp_seconds"} {
		if !strings.Contains(string(body), want) {
			t.Errorf("metrics lack %s", want)
		}
	}

	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("serve returned %v after cancel, want nil", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("serve did not stop after cancel")
	}
	if log := out.String(); strings.Contains(log, "client-token") {
		t.Fatal("a token was logged")
	}
}

// caWaitLog waits (bounded) for a log line matching pattern and returns its
// first group.
func caWaitLog(t *testing.T, out *caSyncBuffer, done <-chan error, pattern string) string {
	t.Helper()
	re := regexp.MustCompile(pattern)
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		if m := re.FindStringSubmatch(out.String()); m != nil {
			return m[1]
		}
		select {
		case err := <-done:
			t.Fatalf("serve exited early: %v\n%s", err, out.String())
		case <-time.After(20 * time.Millisecond):
		}
	}
	t.Fatalf("no log line matching %s:\n%s", pattern, out.String())
	return ""
}

func caReadFile(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func caWriteFile(t *testing.T, path, data string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(data), 0o600); err != nil {
		t.Fatal(err)
	}
}
