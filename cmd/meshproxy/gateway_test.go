package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/meshproxy/meshproxy/internal/e2eutil"
	"github.com/meshproxy/meshproxy/internal/testpki"
)

const gwWait = 60 * time.Second // generous: the machine is shared and loaded

// gwExec runs the command line in-process and returns its exit status and
// error output, as main would.
func gwExec(t *testing.T, args ...string) (int, string) {
	t.Helper()
	root := newRootCmd()
	var out bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&out)
	root.SetArgs(args)
	err := root.ExecuteContext(context.Background())
	if err == nil {
		return 0, out.String()
	}
	var ue usageError
	if errors.As(err, &ue) {
		return 2, err.Error()
	}
	return 1, err.Error()
}

func TestGatewayCommandErrorsNameFlagAndFile(t *testing.T) {
	dir := t.TempDir()
	ca := testpki.New(t, "cluster.local")
	cert, key, bundle := ca.WriteSVID(t, dir, ca.Issue(t, "spiffe://cluster.local/ns/istio-system/sa/ingress", time.Hour))
	files := []string{"--cert-file", cert, "--key-file", key, "--bundle-file", bundle, "--admin", "off", "--metrics", "off", "--health", "off"}
	configDir := t.TempDir()
	gwWriteFile(t, filepath.Join(configDir, "gw.yaml"), "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: gw}\nspec:\n  servers:\n  - port: {number: 443, name: https, protocol: HTTPS}\n    hosts: [\"*\"]\n    tls: {mode: MUTUAL_ISTIO}\n")
	tests := []struct {
		name string
		args []string
		code int
		want []string
	}{
		{"no config dir", append([]string{"gateway", "--credentials-dir", dir}, files...), 2, []string{"--config-dir"}},
		{"no credentials dir", append([]string{"gateway", "--config-dir", configDir}, files...), 2, []string{"--credentials-dir"}},
		{"no identity", []string{"gateway", "--config-dir", configDir, "--credentials-dir", dir}, 2, []string{"identity source"}},
		{"admin not loopback", append([]string{"gateway", "--config-dir", configDir, "--credentials-dir", dir}, append(files, "--admin", "0.0.0.0:15000")...), 2, []string{"--admin"}},
		{"invalid field with --strict-config", append([]string{"gateway", "--config-dir", configDir, "--credentials-dir", dir, "--strict-config"}, files...), 1,
			[]string{"gw.yaml", "spec.servers[0].tls.mode", "MUTUAL_ISTIO"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			code, out := gwExec(t, tc.args...)
			if code != tc.code {
				t.Fatalf("exit %d, want %d: %s", code, tc.code, out)
			}
			for _, w := range tc.want {
				if !strings.Contains(out, w) {
					t.Errorf("error %q does not name %q", out, w)
				}
			}
		})
	}
}

// TestGatewayProcessServesHTTPSIntoStrictSidecar runs the built binary twice
// (a STRICT sidecar in front of an echo app, and the gateway in front of it)
// and sends TLS through both.
func TestGatewayProcessServesHTTPSIntoStrictSidecar(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the meshproxy binary")
	}
	bin := gwBuild(t)
	mesh := testpki.New(t, "cluster.local")
	public := testpki.New(t, "public.test")
	const gatewayID, shopID = "spiffe://cluster.local/ns/istio-system/sa/ingress", "spiffe://cluster.local/ns/shop/sa/web"

	app := gwEcho(t)
	sidecarDir, gatewayDir, configDir, credDir := t.TempDir(), t.TempDir(), t.TempDir(), t.TempDir()
	scCert, scKey, scBundle := mesh.WriteSVID(t, sidecarDir, mesh.Issue(t, shopID, time.Hour))
	gwCert, gwKey, gwBundle := mesh.WriteSVID(t, gatewayDir, mesh.Issue(t, gatewayID, time.Hour))
	certPEM, keyPEM, err := public.IssueLeaf(t, testpki.Leaf{DNSNames: []string{"shop.example.com"}}).Marshal()
	if err != nil {
		t.Fatal(err)
	}
	gwWriteFile(t, filepath.Join(credDir, "shop-cert.crt"), string(certPEM))
	gwWriteFile(t, filepath.Join(credDir, "shop-cert.key"), string(keyPEM))

	sidecarPort, sidecarHealth := gwFreePort(t), gwFreePort(t)
	gatewayPort, gatewayHealth, gatewayAdmin := gwFreePort(t), gwFreePort(t), gwFreePort(t)
	gwWriteFile(t, filepath.Join(configDir, "gateway.yaml"), fmt.Sprintf(`apiVersion: networking.istio.io/v1
kind: Gateway
metadata:
  name: ingress
  namespace: istio-system
spec:
  servers:
  - port: {number: %d, name: https, protocol: HTTPS}
    hosts: ["shop.example.com"]
    tls: {mode: SIMPLE, credentialName: shop-cert}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: shop
  namespace: shop
spec:
  hosts: ["shop.example.com"]
  gateways: ["istio-system/ingress"]
  tcp:
  - route:
    - destination:
        host: 127.0.0.1
        port: {number: %d}
`, gatewayPort, sidecarPort))

	sidecar := gwStart(t, bin, "run", "--cert-file", scCert, "--key-file", scKey, "--bundle-file", scBundle, "--mode", "STRICT",
		"--inbound-explicit", fmt.Sprintf("127.0.0.1:%d=%s", sidecarPort, app),
		"--admin", "off", "--metrics", "off", "--health", fmt.Sprintf("127.0.0.1:%d", sidecarHealth))
	gateway := gwStart(t, bin, "gateway", "--cert-file", gwCert, "--key-file", gwKey, "--bundle-file", gwBundle,
		"--config-dir", configDir, "--credentials-dir", credDir, "--listen-host", "127.0.0.1",
		"--admin", fmt.Sprintf("127.0.0.1:%d", gatewayAdmin), "--metrics", "off", "--health", fmt.Sprintf("127.0.0.1:%d", gatewayHealth))
	gwWaitReady(t, sidecar, sidecarHealth)
	gwWaitReady(t, gateway, gatewayHealth)

	pool := x509.NewCertPool()
	pool.AddCert(public.Root)
	c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", gatewayPort), gwWait)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(gwWait))
	tc := tls.Client(c, &tls.Config{RootCAs: pool, ServerName: "shop.example.com"})
	msg := "GET / HTTP/1.1\r\nHost: shop.example.com\r\n\r\n"
	if _, err := io.WriteString(tc, msg); err != nil {
		t.Fatalf("write through the gateway: %v (gateway log:\n%s)", err, gateway.Output.String())
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(tc, got); err != nil || string(got) != msg {
		t.Fatalf("echo through gateway and sidecar = %q, %v (gateway log:\n%s)", got, err, gateway.Output.String())
	}

	// The gateway's admin API shows the open connection to the service's identity.
	resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/peers", gatewayAdmin))
	if err != nil {
		t.Fatal(err)
	}
	var peers []struct {
		PeerSPIFFEID string `json:"peer_spiffe_id"`
	}
	err = json.NewDecoder(resp.Body).Decode(&peers)
	resp.Body.Close()
	if err != nil || len(peers) != 1 || peers[0].PeerSPIFFEID != shopID {
		t.Errorf("gateway /peers = %+v, %v; want one connection to %s", peers, err, shopID)
	}
	tc.Close()

	for _, p := range []*gwProc{gateway, sidecar} {
		if err := p.Cmd.Process.Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		select {
		case <-p.Done():
			if code := p.Cmd.ProcessState.ExitCode(); code != 0 {
				t.Errorf("%s exited %d after SIGTERM:\n%s", p.name, code, p.Output.String())
			}
		case <-time.After(gwWait):
			t.Fatalf("%s did not stop after SIGTERM:\n%s", p.name, p.Output.String())
		}
	}
	if !strings.Contains(gateway.Output.String(), "stopped") {
		t.Errorf("gateway log lacks the drain: %s", gateway.Output.String())
	}
}

// gwBuild builds the meshproxy binary into a temporary directory.
func gwBuild(t *testing.T) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	bin, err := e2eutil.BuildContext(ctx, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	return bin
}

// gwProc is a running meshproxy process, named by its subcommand.
type gwProc struct {
	*e2eutil.Process
	name string
}

func gwStart(t *testing.T, bin string, args ...string) *gwProc {
	t.Helper()
	return &gwProc{Process: e2eutil.Start(t, bin, []string{"MESHPROXY_LOG_LEVEL=debug"}, args...), name: args[0]}
}

// gwWaitReady polls a process's /healthz/ready until it answers 200.
func gwWaitReady(t *testing.T, p *gwProc, port int) {
	t.Helper()
	url := fmt.Sprintf("http://127.0.0.1:%d/healthz/ready", port)
	client := &http.Client{Timeout: 5 * time.Second}
	deadline := time.Now().Add(gwWait)
	for {
		select {
		case <-p.Done():
			t.Fatalf("%s exited early:\n%s", p.name, p.Output.String())
		default:
		}
		if resp, err := client.Get(url); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s not ready:\n%s", p.name, p.Output.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// gwFreePort returns a loopback port that is free right now and not handed
// out before in this test binary.
func gwFreePort(t *testing.T) int {
	t.Helper()
	_, port, err := net.SplitHostPort(e2eutil.FreeAddr(t))
	if err != nil {
		t.Fatal(err)
	}
	n, err := strconv.Atoi(port)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// gwEcho is an echo server on loopback; it returns its address.
func gwEcho(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Go(func() {
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(2 * gwWait))
				_, _ = io.Copy(c, c)
			})
		}
	})
	t.Cleanup(func() {
		ln.Close()
		wg.Wait()
	})
	return ln.Addr().String()
}

func gwWriteFile(t *testing.T, path, data string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(data), 0o600); err != nil {
		t.Fatal(err)
	}
}
