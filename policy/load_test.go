package policy

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestLoadErrorsNameFileDocumentAndField(t *testing.T) {
	const pa = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: pa\n  namespace: shop\nspec:\n"
	const ap = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: ap\n  namespace: shop\nspec:\n"
	const dr = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: dr\n  namespace: shop\nspec:\n"
	tests := []struct {
		name string
		yaml string
		want []string // all must appear in the error
	}{
		// The bad line is 17; go-yaml reports the block it was parsing (16),
		// counted here from the top of the file, not of the document.
		{"YAML syntax error names the file line",
			"# leading comment\n" + pa + "  mtls: {}\n---\n" + ap + "  rules:\n - from: []\n",
			[]string{"policy.yaml: document 2: line 16: did not find expected key"}},
		{"duplicate YAML key names its line",
			pa + "  mtls:\n    mode: STRICT\n    mode: DISABLE\n",
			[]string{"policy.yaml: document 1: line 9: ", `"mode" already set`}},
		{"tab indentation names its line",
			"---\n" + pa + "\tmtls: {}\n",
			[]string{"policy.yaml: document 1: line 8: "}},
		{"action CUSTOM without rules", ap + "  action: CUSTOM\n", []string{"spec.rules", "CUSTOM"}},
		{"CUSTOM provider", ap + "  action: CUSTOM\n  provider:\n    name: ext\n  rules: [{}]\n", []string{"spec.action", "external authorization"}},
		{"provider without CUSTOM", ap + "  provider:\n    name: ext\n", []string{"spec.provider", "CUSTOM"}},
		{"DENY without rules", ap + "  action: DENY\n", []string{"spec.rules", "DENY"}},
		{"bad ipBlock", ap + "  rules:\n  - from:\n    - source:\n        ipBlocks: [10.0.0.0/33]\n", []string{"source.ipBlocks[0]", "CIDR"}},
		{"unknown when key", ap + "  rules:\n  - when:\n    - key: request.colour\n      values: [red]\n", []string{"spec.rules[0].when[0].key", "unknown attribute"}},
		{"when without values", ap + "  rules:\n  - when:\n    - key: source.ip\n", []string{"spec.rules[0].when[0]", "values"}},
		{"serviceAccounts with principals", ap + "  rules:\n  - from:\n    - source:\n        principals: [a]\n        serviceAccounts: [b]\n", []string{"source.serviceAccounts", "principals"}},
		{"trust domain with a slash", ap + "  rules:\n  - from:\n    - source:\n        trustDomains: [a/b]\n", []string{"source.trustDomains[0]"}},
		{"L7 when key malformed", ap + "  rules:\n  - when:\n    - key: request.headers\n      values: [a]\n", []string{"spec.rules[0].when[0].key", "name[key]"}},
		{"unknown action", ap + "  action: REJECT\n", []string{"spec.action", "REJECT"}},
		{"misspelt field", ap + "  rule:\n  - {}\n", []string{`spec.rule: unknown field "rule"`}},
		{"field in wrong case", pa + "  mtls:\n    Mode: STRICT\n", []string{`spec.mtls.Mode: unknown field`}},
		{"misspelt metadata", strings.Replace(pa, "namespace:", "namepsace:", 1), []string{"metadata.namepsace: unknown field"}},
		{"wrong type", pa + "  mtls:\n    mode: [STRICT]\n", []string{"spec.mtls.mode: want string"}},
		{"bad mtls mode", pa + "  mtls:\n    mode: MUTUAL\n", []string{"spec.mtls.mode", "MUTUAL"}},
		{"port-level mTLS without selector", pa + "  portLevelMtls:\n    8080:\n      mode: DISABLE\n", []string{"spec.portLevelMtls", "selector"}},
		{"port-level port out of range", pa + "  selector:\n    matchLabels:\n      app: a\n  portLevelMtls:\n    70000:\n      mode: DISABLE\n",
			[]string{"spec.portLevelMtls[70000]", "1-65535"}},
		{"port-level bad mode", pa + "  selector:\n    matchLabels:\n      app: a\n  portLevelMtls:\n    80:\n      mode: strictest\n",
			[]string{"spec.portLevelMtls[80].mode"}},
		{"port not a number", ap + "  rules:\n  - to:\n    - operation:\n        ports: [http]\n", []string{"spec.rules[0].to[0].operation.ports[0]", "port number"}},
		{"empty source", ap + "  rules:\n  - from:\n    - source: {}\n", []string{"spec.rules[0].from[0].source", "at least one"}},
		{"missing source", ap + "  rules:\n  - from:\n    - {}\n", []string{"spec.rules[0].from[0].source: required"}},
		{"empty from", ap + "  rules:\n  - from: []\n", []string{"spec.rules[0].from: must not be empty"}},
		{"empty namespace pattern", ap + "  rules:\n  - from:\n    - source:\n        namespaces: [\"\"]\n", []string{"source.namespaces[0]"}},
		{"DR tls mode SIMPLE with a CRL", dr + "  host: a.example.com\n  trafficPolicy:\n    tls:\n      mode: SIMPLE\n      caCrl: /etc/crl.pem\n",
			[]string{"(DestinationRule shop/dr): spec.trafficPolicy.tls.caCrl", "revocation"}},
		{"DR port-level MUTUAL without a client certificate", dr + "  host: 10.0.0.1\n  trafficPolicy:\n    portLevelSettings:\n    - port:\n        number: 80\n      tls:\n        mode: MUTUAL\n",
			[]string{"spec.trafficPolicy.portLevelSettings[0].tls.clientCertificate: required for MUTUAL"}},
		{"DR credentialName with files", dr + "  host: 10.0.0.1\n  trafficPolicy:\n    tls:\n      mode: SIMPLE\n      credentialName: db\n      caCertificates: /ca.pem\n",
			[]string{"spec.trafficPolicy.tls.credentialName", "cannot be set with"}},
		{"DR insecureSkipVerify with a CA", dr + "  host: 10.0.0.1\n  trafficPolicy:\n    tls:\n      mode: SIMPLE\n      insecureSkipVerify: true\n      caCertificates: /ca.pem\n",
			[]string{"spec.trafficPolicy.tls.insecureSkipVerify"}},
		{"DR port-level without port", dr + "  host: 10.0.0.1\n  trafficPolicy:\n    portLevelSettings:\n    - tls:\n        mode: DISABLE\n",
			[]string{"spec.trafficPolicy.portLevelSettings[0].port.number"}},
		{"DR empty traffic policy", dr + "  host: 10.0.0.1\n  trafficPolicy: {}\n", []string{"spec.trafficPolicy", "at least one"}},
		{"DR warmup without duration", dr + "  host: 10.0.0.1\n  trafficPolicy:\n    loadBalancer:\n      warmup:\n        minimumPercent: 5\n", []string{"loadBalancer.warmup.duration: required"}},
		{"DR bad connectTimeout", dr + "  host: 10.0.0.1\n  trafficPolicy:\n    connectionPool:\n      tcp:\n        connectTimeout: soon\n", []string{"connectionPool.tcp.connectTimeout"}},
		{"DR unknown pool field", dr + "  host: 10.0.0.1\n  trafficPolicy:\n    connectionPool:\n      tcp:\n        maxConns: 3\n", []string{"connectionPool.tcp.maxConns: unknown field"}},
		{"DR duplicate port", dr + "  host: 10.0.0.1\n  trafficPolicy:\n    portLevelSettings:\n    - port: {number: 80}\n    - port: {number: 80}\n",
			[]string{"portLevelSettings[1].port.number", "twice"}},
		{"DR without host", dr + "  trafficPolicy:\n    tls:\n      mode: DISABLE\n", []string{"spec.host: required"}},
		{"DR bad host", dr + "  host: \"not a host!\"\n", []string{"spec.host"}},
		{"DR bad SAN", dr + "  host: 10.0.0.1\n  trafficPolicy:\n    tls:\n      mode: ISTIO_MUTUAL\n      subjectAltNames: [\"cluster.local\"]\n",
			[]string{"spec.trafficPolicy.tls.subjectAltNames[0]", "SPIFFE"}},
		{"DR SAN without mTLS", dr + "  host: 10.0.0.1\n  trafficPolicy:\n    tls:\n      subjectAltNames: [\"cluster.local/ns/a/sa/b\"]\n",
			[]string{"spec.trafficPolicy.tls.subjectAltNames", "ISTIO_MUTUAL"}},
		{"DR bad exportTo", dr + "  host: 10.0.0.1\n  exportTo: [\"Not_A_Namespace\"]\n", []string{"spec.exportTo[0]"}},
		{"unsupported version", strings.Replace(pa, "security.istio.io/v1", "security.istio.io/v2", 1), []string{"apiVersion", "security.istio.io/v2"}},
		{"missing name", "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  namespace: shop\nspec: {}\n", []string{"metadata.name: required"}},
		{"invalid name", strings.Replace(pa, "name: pa", "name: Bad_Name", 1), []string{"metadata.name"}},
		{"bad timestamp", strings.Replace(pa, "namespace: shop", "namespace: shop\n  creationTimestamp: yesterday", 1), []string{"metadata.creationTimestamp"}},
		{"same object twice, differently", pa + "  mtls: {}\n---\n" + pa + "  mtls: {mode: STRICT}\n", []string{"document 2 (PeerAuthentication shop/pa): metadata.name: shop/pa is also defined, differently, in ", "policy.yaml: document 1"}},
		{"error inside a List", "apiVersion: v1\nkind: List\nitems:\n- " + strings.ReplaceAll(ap, "\n", "\n  ") + "  action: AUDITING\n",
			[]string{"policy.yaml: document 1: items[0] (AuthorizationPolicy shop/ap): spec.action"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := loadYAML(t, Workload{Namespace: "shop"}, tt.yaml)
			if err == nil {
				t.Fatal("loaded without error")
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q\ndoes not contain %q", err, w)
				}
			}
		})
	}
}

func TestSplitDocuments(t *testing.T) {
	in := "# header comment\n---\na: 1\n--- # comment only\n# nothing\n---\nb: 2\nc: 3\n--- {d: 4}\n---\r\ne: 5\n---not-a-separator: 6\n"
	want := []document{
		{index: 1, line: 3, data: []byte("a: 1\n")},
		{index: 2, line: 7, data: []byte("b: 2\nc: 3\n")},
		{index: 3, line: 9, data: []byte(" {d: 4}\n")},
		{index: 4, line: 11, data: []byte("e: 5\n---not-a-separator: 6\n")},
	}
	got := splitDocuments([]byte(in))
	if len(got) != len(want) {
		t.Fatalf("got %d documents: %+v", len(got), got)
	}
	for i := range want {
		if got[i].index != want[i].index || got[i].line != want[i].line || string(got[i].data) != string(want[i].data) {
			t.Errorf("document %d = {%d %d %q}, want {%d %d %q}", i, got[i].index, got[i].line, got[i].data, want[i].index, want[i].line, want[i].data)
		}
	}
}

func TestJSONSyntaxErrorNamesLine(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, dir, "dr.json", "{\n  \"apiVersion\": \"networking.istio.io/v1\",\n  \"kind\": \"DestinationRule\"\n  \"spec\": {}\n}\n")
	_, err := NewStore(dir, Workload{Namespace: "shop"}, quiet, WithStrictConfig(true))
	if err == nil || !strings.Contains(err.Error(), "dr.json: document 1: line ") {
		t.Fatalf("err = %v", err)
	}
}

func TestAllErrorsOfADirectoryAreReported(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, dir, "a.yaml", "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: a\nspec:\n  action: NOPE\n")
	writeFile(t, dir, "b.yaml", "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: b\nspec:\n  mtls:\n    mode: NOPE\n")
	_, err := NewStore(dir, Workload{Namespace: "shop"}, quiet, WithStrictConfig(true))
	if err == nil || !strings.Contains(err.Error(), "a.yaml") || !strings.Contains(err.Error(), "b.yaml") {
		t.Fatalf("err = %v", err)
	}
}

func TestLoadTestdata(t *testing.T) {
	dns := newFakeDNS(map[string]string{"payments.prod.svc.cluster.local": "10.40.0.9"})
	st, err := NewStore("testdata", Workload{Namespace: "prod", Labels: map[string]string{"app": "payments"}}, quiet, WithResolver(dns.resolve))
	if err != nil {
		t.Fatal(err)
	}
	snap := st.Current()
	checks := []struct {
		port uint16
		want Mode
	}{{8080, ModeStrict}, {9090, ModeDisable}, {8443, ModeStrict}}
	for _, c := range checks {
		if got := snap.InboundMode(c.port); got != c.want {
			t.Errorf("InboundMode(%d) = %v, want %v", c.port, got, c.want)
		}
	}
	for peer, allowed := range map[string]bool{
		"spiffe://cluster.local/ns/prod/sa/checkout":   true,
		"spiffe://cluster.local/ns/prod/sa/refunds-eu": true,
		"spiffe://cluster.local/ns/prod/sa/ads":        false,
		"":                                             false, // the mesh-wide require-mtls DENY
	} {
		if d := snap.Authorize(Request{Peer: id(t, peer), Port: 8080}); d.Allowed != allowed {
			t.Errorf("Authorize(%q) = %+v, want allowed=%v", peer, d, allowed)
		}
	}
	if d := snap.Authorize(Request{Port: 15021}); d.Allowed || d.Reason != ReasonNoAllowMatch {
		t.Errorf("plaintext health probe: %+v (no DENY, but no ALLOW matches either)", d)
	}
	out := snap.Outbound(mustAddrPort("10.40.0.9:443"))
	if !out.MTLS || len(out.SANs) != 2 || out.SANs[1].String() != "spiffe://cluster.local/ns/prod/sa/payments-canary" {
		t.Errorf("payments: %+v", out)
	}
	if out := snap.Outbound(mustAddrPort("10.30.0.7:9100")); !out.Matched || out.MTLS {
		t.Errorf("json rule: %+v", out)
	}
	if out := snap.Outbound(mustAddrPort("10.20.3.4:8443")); !out.MTLS {
		t.Errorf("port level: %+v", out)
	}

	// Another workload of the same directory.
	st, err = NewStore("testdata", Workload{Namespace: "bookinfo", Labels: map[string]string{"app": "reviews"}}, quiet, WithResolver(dns.resolve))
	if err != nil {
		t.Fatal(err)
	}
	snap = st.Current()
	for _, c := range []struct {
		peer    string
		port    uint16
		allowed bool
	}{
		{"spiffe://cluster.local/ns/bookinfo/sa/bookinfo-productpage", 9080, true},
		{"spiffe://cluster.local/ns/bookinfo/sa/bookinfo-productpage", 9081, false},
		{"spiffe://cluster.local/ns/sandbox/sa/bookinfo-productpage", 9080, false},
		{"spiffe://cluster.local/ns/bookinfo/sa/bookinfo-ratings", 9080, false},
	} {
		if d := snap.Authorize(Request{Peer: id(t, c.peer), Port: c.port}); d.Allowed != c.allowed {
			t.Errorf("Authorize(%q, %d) = %+v, want allowed=%v", c.peer, c.port, d, c.allowed)
		}
	}
	if snap.InboundMode(9080) != ModeStrict {
		t.Errorf("bookinfo mode = %v, want the mesh STRICT", snap.InboundMode(9080))
	}
}

// TestConfigMapLayout builds the directory a kubelet mounts for a ConfigMap:
// name → ..data/name, ..data → ..TIMESTAMP/, and swaps it atomically.
func TestConfigMapLayout(t *testing.T) {
	dir := t.TempDir()
	mkVersion := func(ts, content string) {
		if err := os.Mkdir(filepath.Join(dir, ts), 0o755); err != nil {
			t.Fatal(err)
		}
		writeFile(t, filepath.Join(dir, ts), "policy.yaml", content)
		// The dot-dir's own files must not be read twice or as stray content.
		writeFile(t, filepath.Join(dir, ts), "ignored.txt", "not yaml: [")
	}
	swap := func(ts string) {
		tmp := filepath.Join(dir, "..data_tmp")
		if err := os.Symlink(ts, tmp); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, filepath.Join(dir, "..data")); err != nil {
			t.Fatal(err)
		}
	}
	mkVersion("..2025_01_01_00_00_00.1", peerAuth("shop", "default", "", "", "STRICT", nil))
	swap("..2025_01_01_00_00_00.1")
	if err := os.Symlink(filepath.Join("..data", "policy.yaml"), filepath.Join(dir, "policy.yaml")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(filepath.Join("..data", "removed.yaml"), filepath.Join(dir, "removed.yaml")); err != nil {
		t.Fatal(err) // dangling, as after a key was dropped from the ConfigMap
	}
	st, err := NewStore(dir, Workload{Namespace: "shop"}, quiet, WithPollInterval(20*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	if got := st.Current().InboundMode(80); got != ModeStrict {
		t.Fatalf("mode = %v", got)
	}
	stop := runStore(t, st)
	defer stop()
	mkVersion("..2025_01_01_00_01_00.2", peerAuth("shop", "default", "", "", "DISABLE", nil))
	swap("..2025_01_01_00_01_00.2")
	waitFor(t, "the swapped ConfigMap", func() bool { return st.Current().InboundMode(80) == ModeDisable })
}

func TestUnknownKindsAndFilesAreIgnored(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, dir, "README.md", "# not policy: [")
	writeFile(t, dir, ".hidden.yaml", "not: [valid")
	writeFile(t, dir, "vs.yaml", "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: x\nspec:\n  http: [{}]\n")
	writeFile(t, dir, "cm.yml", "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\ndata:\n  a: b\n---\n# only a comment\n---\n")
	writeFile(t, dir, "scalar.yaml", "just a string\n")
	if err := os.Mkdir(filepath.Join(dir, "sub.yaml"), 0o755); err != nil {
		t.Fatal(err)
	}
	st, err := NewStore(dir, Workload{Namespace: "shop"}, quiet)
	if err != nil {
		t.Fatal(err)
	}
	if st.Current().InboundMode(1) != ModePermissive {
		t.Error("defaults expected")
	}
}

func TestNewStoreRejectsMissingDir(t *testing.T) {
	if _, err := NewStore(filepath.Join(t.TempDir(), "nope"), Workload{}, quiet); err == nil {
		t.Error("missing dir accepted")
	}
	if _, err := NewStore("", Workload{}, quiet); err == nil {
		t.Error("empty dir accepted")
	}
	f := writeFile(t, t.TempDir(), "file.yaml", "")
	if _, err := NewStore(f, Workload{}, quiet); err == nil {
		t.Error("file accepted as dir")
	}
}

func TestSnapshotJSON(t *testing.T) {
	dns := newFakeDNS(map[string]string{"payments.prod.svc.cluster.local": "10.40.0.9"})
	st, err := NewStore("testdata", Workload{Namespace: "prod", Labels: map[string]string{"app": "payments"}}, quiet, WithResolver(dns.resolve))
	if err != nil {
		t.Fatal(err)
	}
	b, err := json.Marshal(st.Current())
	if err != nil {
		t.Fatal(err)
	}
	var v struct {
		Generation         uint64 `json:"generation"`
		Namespace          string `json:"namespace"`
		DefaultMode        string `json:"default_mode"`
		PeerAuthentication struct {
			Mode           string            `json:"mode"`
			Ports          map[string]string `json:"port_modes"`
			WorkloadPolicy string            `json:"workload_policy"`
		} `json:"peer_authentication"`
		Authorization []struct {
			Policy string `json:"policy"`
			Action string `json:"action"`
		} `json:"authorization_policies"`
		DestinationRules []struct {
			Rule string `json:"rule"`
			Mode string `json:"tls_mode"`
		} `json:"destination_rules"`
		ResolvedHosts map[string][]string `json:"resolved_hosts"`
	}
	if err := json.Unmarshal(b, &v); err != nil {
		t.Fatal(err)
	}
	if v.Generation != 1 || v.Namespace != "prod" || v.DefaultMode != "PERMISSIVE" || v.PeerAuthentication.Mode != "STRICT" ||
		v.PeerAuthentication.Ports["9090"] != "DISABLE" || v.PeerAuthentication.WorkloadPolicy != "prod/payments-metrics" {
		t.Errorf("peer authentication view: %s", b)
	}
	if len(v.Authorization) != 2 || v.Authorization[0].Action != "DENY" || v.Authorization[1].Policy != "prod/payments-callers" {
		t.Errorf("authorization view: %s", b)
	}
	if len(v.DestinationRules) == 0 || v.ResolvedHosts["payments.prod.svc.cluster.local"][0] != "10.40.0.9" {
		t.Errorf("destination rules view: %s", b)
	}
}
