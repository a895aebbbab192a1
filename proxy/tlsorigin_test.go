package proxy

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"net/netip"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/meshproxy/meshproxy/internal/fileread"
	"github.com/meshproxy/meshproxy/internal/testpki"
	"github.com/meshproxy/meshproxy/proxy/mesh"
)

// tlsEcho is an external TLS server (not in the mesh) echoing bytes; with
// clientCAs it requires a client certificate from them.
func tlsEcho(t *testing.T, ca *testpki.CA, dnsName string, clientCAs *x509.CertPool) uint16 {
	t.Helper()
	svid := ca.IssueLeaf(t, testpki.Leaf{DNSNames: []string{dnsName}})
	cfg := &tls.Config{Certificates: []tls.Certificate{testpki.TLSCertificate(svid)}, MinVersion: tls.VersionTLS12}
	if clientCAs != nil {
		cfg.ClientAuth, cfg.ClientCAs = tls.RequireAndVerifyClientCert, clientCAs
	}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(clientWait))
				_, _ = io.Copy(c, c)
			}()
		}
	}()
	return uint16(ln.Addr().(*net.TCPAddr).Port)
}

// TestDestinationRuleOriginatesTLS: tls.mode SIMPLE and MUTUAL wrap the
// app's plaintext in TLS to the destination, verified by the CA file, the
// subjectAltNames or the SNI; a server failing verification is refused.
func TestDestinationRuleOriginatesTLS(t *testing.T) {
	m := newMesh(t)
	external := testpki.New(t, "external.example") // the external service's own PKI
	dir := t.TempDir()
	caFile := filepath.Join(dir, "ca.pem")
	testpki.WriteFile(t, caFile, testpki.PEMCerts(external.Root))
	client := external.IssueLeaf(t, testpki.Leaf{DNSNames: []string{"client.example"}})
	certFile, keyFile, _ := external.WriteSVID(t, dir, client)
	creds := t.TempDir()
	credCert, credKey, _ := external.WriteSVID(t, t.TempDir(), client)
	for src, dst := range map[string]string{credCert: "db.crt", credKey: "db.key", caFile: "db-ca.crt"} {
		testpki.WriteFile(t, filepath.Join(creds, dst), mustRead(t, src))
	}
	clientCAs := x509.NewCertPool()
	clientCAs.AddCert(external.Root)
	simple := tlsEcho(t, external, "db.example.com", nil)
	mutual := tlsEcho(t, external, "db.example.com", clientCAs)

	rule := func(tls string) string {
		return "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: db\n  namespace: default\nspec:\n  host: 10.200.0.0/16\n  trafficPolicy:\n    tls:\n" + tls
	}
	tests := []struct {
		name, tls string
		port      uint16
		ok        bool
		decision  string
	}{
		{"SIMPLE with CA file and SNI", "      mode: SIMPLE\n      caCertificates: " + caFile + "\n      sni: db.example.com\n", simple, true, DecisionAllow},
		{"SIMPLE with subjectAltNames", "      mode: SIMPLE\n      caCertificates: " + caFile + "\n      subjectAltNames: [db.example.com]\n", simple, true, DecisionAllow},
		{"SIMPLE refuses a server of another name", "      mode: SIMPLE\n      caCertificates: " + caFile + "\n      sni: other.example.com\n", simple, false, DecisionHandshakeFailed},
		{"SIMPLE refuses a server the system roots do not trust", "      mode: SIMPLE\n      sni: db.example.com\n", simple, false, DecisionHandshakeFailed},
		{"SIMPLE insecureSkipVerify", "      mode: SIMPLE\n      insecureSkipVerify: true\n", simple, true, DecisionAllow},
		{"MUTUAL with files", "      mode: MUTUAL\n      caCertificates: " + caFile + "\n      clientCertificate: " + certFile + "\n      privateKey: " + keyFile + "\n      sni: db.example.com\n", mutual, true, DecisionAllow},
		{"MUTUAL with credentialName", "      mode: MUTUAL\n      credentialName: db\n      sni: db.example.com\n", mutual, true, DecisionAllow},
		{"SIMPLE to a server wanting a client certificate", "      mode: SIMPLE\n      caCertificates: " + caFile + "\n      sni: db.example.com\n", mutual, false, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			st, _ := policyStore(t, rule(tt.tls))
			if snap := st.Current(); snap.Outbound(netip.MustParseAddrPort("10.200.0.5:1")).Originate == nil {
				t.Fatalf("rule not applied: %s", mustJSON(t, snap))
			}
			p := startProxy(t, m.identity(t, webID), st,
				WithOutboundTransparent("127.0.0.1:0"),
				WithOriginalDst(fixedDst(fmt.Sprintf("10.200.0.5:%d", tt.port))),
				WithDialer(&mapDialer{}), WithCredentialsDir(creds))
			before := connections(mesh.DirOutbound, ModeTLSOrigination, tt.decision)
			err := plaintextClient(t, p.Addrs()[0].String())
			if (err == nil) != tt.ok {
				t.Fatalf("round trip: %v, want ok=%v", err, tt.ok)
			}
			if tt.decision != "" {
				eventually(t, "counted", func() bool { return connections(mesh.DirOutbound, ModeTLSOrigination, tt.decision) == before+1 })
			}
		})
	}
}

func mustRead(t *testing.T, path string) []byte {
	t.Helper()
	b, err := fileread.Read(path, fileread.MaxPEM)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func mustJSON(t *testing.T, v interface{ MarshalJSON() ([]byte, error) }) string {
	t.Helper()
	b, err := v.MarshalJSON()
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}
