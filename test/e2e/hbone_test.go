package e2e

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net"
	"testing"
	"time"

	"github.com/meshproxy/meshproxy/internal/e2eutil"
	"github.com/meshproxy/meshproxy/internal/testpki"
)

// TestHBONESharesOneHandshakeAcrossConnections runs two real sidecars with
// --hbone: many application connections travel as CONNECT streams over one
// pooled mTLS connection, so the server sidecar sees a single handshake, and
// the client's identity still reaches the server's /peers.
func TestHBONESharesOneHandshakeAcrossConnections(t *testing.T) {
	pki := testpki.New(t, "cluster.local")
	app := echoApp(t)
	in, hbone, out := freeAddr(t), freeAddr(t), freeAddr(t)
	sa, ca := newSidecarAddrs(t), newSidecarAddrs(t)
	start(t, append(append([]string{"run", "--mode", "STRICT", "--hbone", "--hbone-listen", hbone,
		"--inbound-explicit", in + "=" + app}, fileIdentity(t, pki, serverID)...), sa.flags()...)...)
	start(t, append(append([]string{"run", "--hbone", "--hbone-listen", "off",
		"--outbound-explicit", out + "=" + in + "#" + serverID, "--hbone-peer", in + "=" + hbone},
		fileIdentity(t, pki, clientID)...), ca.flags()...)...)
	sa.waitReady(t)
	ca.waitReady(t)

	before, err := e2eutil.Metric("http://"+sa.metrics+"/metrics", "meshproxy_handshakes_total", "direction", "inbound", "result", "ok")
	if err != nil {
		before = 0 // no handshake counted yet
	}
	const conns = 8
	var held []net.Conn
	for i := range conns {
		c, err := net.DialTimeout("tcp", out, 5*time.Second)
		if err != nil {
			t.Fatalf("dial client sidecar: %v", err)
		}
		held = append(held, c)
		_ = c.SetDeadline(time.Now().Add(20 * time.Second))
		msg := fmt.Sprintf("hello %d\n", i)
		if _, err := c.Write([]byte(msg)); err != nil {
			t.Fatal(err)
		}
		got, err := bufio.NewReader(c).ReadString('\n')
		if err != nil || got != msg {
			t.Fatalf("connection %d through HBONE: got %q, %v; want %q", i, got, err, msg)
		}
	}
	code, body, err := httpGet("http://" + sa.admin + "/peers")
	if err != nil || code != 200 {
		t.Fatalf("server /peers: %d %v", code, err)
	}
	var peers []struct {
		Mode         string `json:"mode"`
		PeerSPIFFEID string `json:"peer_spiffe_id"`
	}
	if err := json.Unmarshal([]byte(body), &peers); err != nil {
		t.Fatalf("server /peers: %v\n%s", err, body)
	}
	streams := 0
	for _, p := range peers {
		if p.Mode == "hbone" && p.PeerSPIFFEID == clientID {
			streams++
		}
	}
	if streams != conns {
		t.Fatalf("server /peers lists %d hbone streams from %s, want %d:\n%s", streams, clientID, conns, body)
	}
	for _, c := range held {
		c.Close()
	}
	after, err := e2eutil.Metric("http://"+sa.metrics+"/metrics", "meshproxy_handshakes_total", "direction", "inbound", "result", "ok")
	if err != nil {
		t.Fatalf("read server handshakes: %v", err)
	}
	if got := after - before; got != 1 {
		t.Fatalf("server sidecar did %v inbound handshakes for %d connections, want 1 (one pooled HBONE connection)", got, conns)
	}
}
