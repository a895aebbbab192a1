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
	"io"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

func TestServeAnswersWithText(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- run(ctx, []string{"serve", "-listen", addr, "-text", "hi there"}, &bytes.Buffer{}) }()
	var out bytes.Buffer
	var gerr error
	for range 50 {
		out.Reset()
		if gerr = run(context.Background(), []string{"get", "http://" + addr + "/x"}, &out); gerr == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if gerr != nil || out.String() != "hi there\n" {
		t.Fatalf("get = %q, %v; want the served text", out.String(), gerr)
	}
	out.Reset()
	if err := run(context.Background(), []string{"get", "-timeout", "50ms", "http://" + addr + "/?hold=10s"}, &out); err == nil {
		t.Errorf("?hold=10s answered within 50ms: %q", out.String())
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("serve after cancel: %v", err)
	}
}

func TestGetFailsOnErrorStatus(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost {
			http.Error(w, "want POST", http.StatusMethodNotAllowed)
			return
		}
		w.Write([]byte("rotated"))
	}))
	defer srv.Close()
	if err := run(context.Background(), []string{"get", srv.URL}, &bytes.Buffer{}); err == nil || !strings.Contains(err.Error(), "405") {
		t.Errorf("get of a 405: err = %v, want the status", err)
	}
	var out bytes.Buffer
	if err := run(context.Background(), []string{"get", "-method", "POST", srv.URL}, &out); err != nil || out.String() != "rotated" {
		t.Errorf("POST = %q, %v", out.String(), err)
	}
}

func TestLoopReportsEachResult(t *testing.T) {
	n := 0
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n++
		if n == 2 {
			http.Error(w, "no", http.StatusForbidden)
			return
		}
		w.Write([]byte("yes"))
	}))
	defer srv.Close()
	ctx, cancel := context.WithCancel(context.Background())
	var out syncBuffer
	done := make(chan error, 1)
	go func() { done <- run(ctx, []string{"loop", "-every", "1ms", srv.URL}, &out) }()
	for range 500 {
		if strings.Count(out.String(), "\n") >= 3 {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(out.String(), "\n")
	if len(lines) < 3 || lines[0] != "ok 200 yes" || lines[1] != "request failed: status 403" || lines[2] != "ok 200 yes" {
		t.Errorf("loop output %q: want ok, failed, ok", out.String())
	}
}

func TestUnknownCommand(t *testing.T) {
	if err := run(context.Background(), []string{"frobnicate"}, &bytes.Buffer{}); err == nil {
		t.Error("unknown command accepted")
	}
	if err := run(context.Background(), nil, &bytes.Buffer{}); err == nil {
		t.Error("no command accepted")
	}
}

// syncBuffer is a bytes.Buffer safe for one writer and one reader.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

func TestServeTLS(t *testing.T) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), DNSNames: []string{"vault.example.com"},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600)
	os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600)
	if err := run(context.Background(), []string{"serve", "-tls-cert", certFile}, &bytes.Buffer{}); err == nil {
		t.Error("-tls-cert without -tls-key accepted")
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, []string{"serve", "-listen", addr, "-text", "secret", "-tls-cert", certFile, "-tls-key", keyFile}, &bytes.Buffer{})
	}()
	leaf, _ := x509.ParseCertificate(der)
	roots := x509.NewCertPool()
	roots.AddCert(leaf)
	c := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots, ServerName: "vault.example.com"}}}
	var body []byte
	for range 50 {
		resp, err := c.Get("https://" + addr + "/")
		if err == nil {
			body, _ = io.ReadAll(resp.Body)
			resp.Body.Close()
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if string(body) != "secret\n" {
		t.Errorf("HTTPS body %q, want the text", body)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}
