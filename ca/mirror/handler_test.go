package mirror

import (
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/meshproxy/meshproxy/internal/testpki"
)

const servingID = "spiffe://cluster.local/ns/istio-system/sa/meshproxy-ca"

// testServer serves NewHandler(m) over TLS with a CA serving SVID, as
// ca.Server.ServeConfig does.
func testServer(t *testing.T, pki *testpki.CA, m *Mirror) *httptest.Server {
	t.Helper()
	ts := httptest.NewUnstartedServer(NewHandler(m, pki.Bundle(), WithHandlerLogger(discard())))
	ts.TLS = &tls.Config{
		Certificates: []tls.Certificate{testpki.TLSCertificate(pki.Issue(t, servingID, time.Hour))},
		ClientAuth:   tls.RequestClientCert,
	}
	ts.StartTLS()
	t.Cleanup(ts.Close)
	return ts
}

// client is an mTLS client presenting svid (none if nil) and verifying the
// server's SPIFFE ID.
func client(t *testing.T, pki *testpki.CA, svid *x509svid.SVID) *http.Client {
	t.Helper()
	conf := tlsconfig.TLSClientConfig(pki.Bundle(), tlsconfig.AuthorizeID(spiffeid.RequireFromString(servingID)))
	if svid != nil {
		conf = tlsconfig.MTLSClientConfig(svid, pki.Bundle(), tlsconfig.AuthorizeID(spiffeid.RequireFromString(servingID)))
	}
	c := &http.Client{Transport: &http.Transport{TLSClientConfig: conf}}
	t.Cleanup(c.CloseIdleConnections)
	return c
}

func get(t *testing.T, c *http.Client, url string) (int, []byte) {
	t.Helper()
	resp, err := c.Get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, b
}

func object(kind, ns, name, spec string) json.RawMessage {
	return json.RawMessage(fmt.Sprintf(`{"apiVersion":"x/v1","kind":%q,"metadata":{"name":%q,"namespace":%q,"uid":"u-1","resourceVersion":"7",
		"managedFields":[{"manager":"kubectl"}],"annotations":{"kubectl.kubernetes.io/last-applied-configuration":"{}","istio.io/dry-run":"true"}},
		"spec":%s,"status":{"validationMessages":[]}}`, kind, name, ns, spec))
}

// synced returns a mirror holding objs (PeerAuthentications), every
// resource listed, as after a successful first sync.
func synced(objs ...json.RawMessage) *Mirror {
	m := New(nil, WithLogger(discard()))
	for i := range m.res {
		var items []json.RawMessage
		if i == 0 {
			items = objs
		}
		m.replace(i, items)
	}
	return m
}

func TestWorkloadReceivesOnlyItsNamespaceAndTheRootNamespace(t *testing.T) {
	pki := testpki.New(t, "cluster.local")
	m := synced(
		object("PeerAuthentication", "web", "strict", `{"mtls":{"mode":"STRICT"}}`),
		object("PeerAuthentication", "istio-system", "default", `{"mtls":{"mode":"PERMISSIVE"}}`),
		object("PeerAuthentication", "other", "secret", `{"mtls":{"mode":"DISABLE"}}`),
	)
	ts := testServer(t, pki, m)
	c := client(t, pki, pki.Issue(t, "spiffe://cluster.local/ns/web/sa/api", time.Hour))

	code, body := get(t, c, ts.URL+Path)
	if code != http.StatusOK {
		t.Fatalf("status %d: %s", code, body)
	}
	var r Response
	if err := json.Unmarshal(body, &r); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(r.Namespaces, []string{"web", "istio-system"}) {
		t.Errorf("namespaces %v, want web, istio-system", r.Namespaces)
	}
	var names []string
	for _, d := range r.Documents {
		var o struct {
			APIVersion string `json:"apiVersion"`
			Metadata   struct {
				Namespace, Name string
				Annotations     map[string]string
			}
		}
		if err := json.Unmarshal(d, &o); err != nil {
			t.Fatal(err)
		}
		names = append(names, o.Metadata.Namespace+"/"+o.Metadata.Name)
		if o.APIVersion != "security.istio.io/v1" {
			t.Errorf("apiVersion %q, want the mirrored security.istio.io/v1", o.APIVersion)
		}
		if o.Metadata.Annotations["istio.io/dry-run"] != "true" || len(o.Metadata.Annotations) != 1 {
			t.Errorf("annotations %v: want istio.io/dry-run kept, kubectl's last-applied copy dropped", o.Metadata.Annotations)
		}
		for _, server := range []string{"managedFields", "resourceVersion", "uid", "status"} {
			if strings.Contains(string(d), server) {
				t.Errorf("served document keeps server-side field %s: %s", server, d)
			}
		}
	}
	slices.Sort(names)
	if !slices.Equal(names, []string{"istio-system/default", "web/strict"}) {
		t.Errorf("documents %v, want web's and istio-system's only", names)
	}
}

func TestRefusesCallersWithoutAWorkloadSVID(t *testing.T) {
	pki := testpki.New(t, "cluster.local")
	other := testpki.New(t, "cluster.local") // same name, different root
	ts := testServer(t, pki, synced())
	for _, tc := range []struct {
		name string
		c    *http.Client
		want int
	}{
		{"no client certificate", client(t, pki, nil), http.StatusUnauthorized},
		{"SVID of another CA", client(t, pki, other.Issue(t, "spiffe://cluster.local/ns/web/sa/api", time.Hour)), http.StatusUnauthorized},
		{"not a workload ID", client(t, pki, pki.Issue(t, "spiffe://cluster.local/gateway", time.Hour)), http.StatusForbidden},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, body := get(t, tc.c, ts.URL+Path)
			if code != tc.want {
				t.Fatalf("status %d (%s), want %d", code, body, tc.want)
			}
			if strings.Contains(string(body), "spec") {
				t.Errorf("refusal carries documents: %s", body)
			}
		})
	}
}

func TestNotSyncedMirrorAnswers503WithTheReason(t *testing.T) {
	pki := testpki.New(t, "cluster.local")
	m := New(nil, WithLogger(discard()))
	m.replace(0, nil)
	m.fail(1, fmt.Errorf("%w: list authorizationpolicies.security.istio.io", ErrForbidden))
	ts := testServer(t, pki, m)
	code, body := get(t, client(t, pki, pki.Issue(t, "spiffe://cluster.local/ns/web/sa/api", time.Hour)), ts.URL+Path)
	if code != http.StatusServiceUnavailable {
		t.Fatalf("status %d, want 503", code)
	}
	for _, want := range []string{"not synced", "authorizationpolicies.security.istio.io: forbidden", "destinationrules.networking.istio.io"} {
		if !strings.Contains(string(body), want) {
			t.Errorf("body %q does not name %q", body, want)
		}
	}
}

func TestLongPollAnswersTheNextVersion(t *testing.T) {
	pki := testpki.New(t, "cluster.local")
	m := synced(object("PeerAuthentication", "web", "a", `{"mtls":{"mode":"PERMISSIVE"}}`))
	ts := testServer(t, pki, m)
	c := client(t, pki, pki.Issue(t, "spiffe://cluster.local/ns/web/sa/api", time.Hour))
	v := m.Current().Version

	// Up to date and no wait: nothing new.
	if code, _ := get(t, c, fmt.Sprintf("%s%s?version=%d&wait=0s", ts.URL, Path, v)); code != http.StatusNotModified {
		t.Fatalf("status %d for the current version, want 304", code)
	}
	// Up to date and waiting: the change made meanwhile is the answer.
	type result struct {
		code int
		body []byte
	}
	done := make(chan result, 1)
	go func() {
		resp, err := c.Get(fmt.Sprintf("%s%s?version=%d&wait=60s", ts.URL, Path, v))
		if err != nil {
			done <- result{}
			return
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		done <- result{resp.StatusCode, b}
	}()
	if err := m.apply(0, "MODIFIED", object("PeerAuthentication", "web", "a", `{"mtls":{"mode":"STRICT"}}`)); err != nil {
		t.Fatal(err)
	}
	r := <-done
	if r.code != http.StatusOK || !strings.Contains(string(r.body), "STRICT") {
		t.Fatalf("long poll answered %d %s, want the STRICT version", r.code, r.body)
	}
	var resp Response
	if err := json.Unmarshal(r.body, &resp); err != nil || resp.Version <= v {
		t.Fatalf("version %d (%v), want above %d", resp.Version, err, v)
	}
	// A metadata-only change (same served document) is no new version.
	before := m.Current().Version
	if err := m.apply(0, "MODIFIED", object("PeerAuthentication", "web", "a", `{"mtls":{"mode":"STRICT"}}`)); err != nil {
		t.Fatal(err)
	}
	if m.Current().Version != before {
		t.Error("an unchanged document bumped the version")
	}
	for _, bad := range []string{"version=x", "wait=forever", "version=-1"} {
		if code, _ := get(t, c, ts.URL+Path+"?"+bad); code != http.StatusBadRequest {
			t.Errorf("%s: status %d, want 400", bad, code)
		}
	}
}
