package mirror_test

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http/httptest"
	"net/netip"
	"os"

	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/meshproxy/meshproxy/ca/authn"
	"github.com/meshproxy/meshproxy/ca/mirror"
	"github.com/meshproxy/meshproxy/internal/e2eutil"
	"github.com/meshproxy/meshproxy/internal/kubetest"
	"github.com/meshproxy/meshproxy/internal/testpki"
	"github.com/meshproxy/meshproxy/policy"
	"github.com/meshproxy/meshproxy/policy/remote"
)

const servingID = "spiffe://cluster.local/ns/istio-system/sa/meshproxy-ca"

// source is a workload identity for remote.New.
type source struct {
	*x509svid.SVID
	*x509bundle.Bundle
}

func discard() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// run starts a mirror with the credentials of kubeconfig until the test ends.
func run(t *testing.T, kubeconfig string) *mirror.Mirror {
	t.Helper()
	api, err := authn.KubeconfigAPI(kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(api.CloseIdleConnections)
	m := mirror.New(api, mirror.WithLogger(discard()))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { _ = m.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	return m
}

// spec returns the served spec of kind ns/name, or "" if not served.
func spec(m *mirror.Mirror, kind, ns, name string) string {
	docs, _ := m.Documents(ns)
	for _, d := range docs {
		if d.Kind == kind && d.Name == name {
			var o struct {
				Spec json.RawMessage `json:"spec"`
			}
			_ = json.Unmarshal(d.JSON, &o)
			return string(o.Spec)
		}
	}
	return ""
}

const rbacManifest = "../../deploy/kubernetes/base/ca-rbac.yaml"

func TestMirrorAgainstAPIServer(t *testing.T) {
	c := kubetest.Start(t)
	c.InstallIstioCRDs(t)
	c.Apply(t, []byte("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: web\n"))
	rbac, err := os.ReadFile(rbacManifest)
	if err != nil {
		t.Fatal(err)
	}
	// The CA's service account with the shipped RBAC manifest, nothing else.
	caKubeconfig := c.ServiceAccountKubeconfig(t, "istio-system", "meshproxy-ca")
	c.Apply(t, rbac)

	t.Run("with the shipped ClusterRole it follows create, update and delete", func(t *testing.T) {
		c.Apply(t, []byte(`apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: before-start
  namespace: web
spec:
  mtls:
    mode: PERMISSIVE
`))
		m := run(t, caKubeconfig)
		e2eutil.Eventually(t, "mirror synced", 30*time.Second, func() error { return m.Current().Err })
		if got := spec(m, "PeerAuthentication", "web", "before-start"); !strings.Contains(got, "PERMISSIVE") {
			t.Fatalf("listed spec %q, want the object created before the mirror started", got)
		}
		c.Apply(t, []byte(`apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: strict
  namespace: web
spec:
  mtls:
    mode: STRICT
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-client
  namespace: web
spec:
  action: DENY
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/web/sa/client"]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: api
  namespace: web
spec:
  host: api.web.svc.cluster.local
  trafficPolicy:
    tls:
      mode: ISTIO_MUTUAL
`))
		e2eutil.Eventually(t, "watched creates", 10*time.Second, func() error {
			for _, k := range [][2]string{{"PeerAuthentication", "strict"}, {"AuthorizationPolicy", "deny-client"}, {"DestinationRule", "api"}} {
				if spec(m, k[0], "web", k[1]) == "" {
					return fmt.Errorf("%s web/%s not mirrored", k[0], k[1])
				}
			}
			return nil
		})
		c.Apply(t, []byte("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: strict\n  namespace: web\nspec:\n  mtls:\n    mode: DISABLE\n"))
		e2eutil.Eventually(t, "watched update", 10*time.Second, func() error {
			if got := spec(m, "PeerAuthentication", "web", "strict"); !strings.Contains(got, "DISABLE") {
				return fmt.Errorf("spec %q", got)
			}
			return nil
		})
		c.Delete(t, "security.istio.io/v1", "AuthorizationPolicy", "web", "deny-client")
		e2eutil.Eventually(t, "watched delete", 10*time.Second, func() error {
			if got := spec(m, "AuthorizationPolicy", "web", "deny-client"); got != "" {
				return fmt.Errorf("still served: %s", got)
			}
			return nil
		})
	})

	t.Run("a sidecar's syncer writes its documents and the policy store loads them", func(t *testing.T) {
		c.Apply(t, []byte("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: only-web\n  namespace: web\nspec:\n  selector:\n    matchLabels:\n      app: api\n  portLevelMtls:\n    \"8080\":\n      mode: STRICT\n"+
			"---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: other\n---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: other-ns\n  namespace: other\nspec:\n  mtls:\n    mode: DISABLE\n"))
		m := run(t, caKubeconfig)
		e2eutil.Eventually(t, "mirror synced", 30*time.Second, func() error { return m.Current().Err })
		pki := testpki.New(t, "cluster.local")
		ts := httptest.NewUnstartedServer(mirror.NewHandler(m, pki.Bundle(), mirror.WithHandlerLogger(discard())))
		ts.TLS = &tls.Config{Certificates: []tls.Certificate{testpki.TLSCertificate(pki.Issue(t, servingID, time.Hour))}, ClientAuth: tls.RequestClientCert}
		ts.StartTLS()
		defer ts.Close()
		dir := t.TempDir()
		wl := source{pki.Issue(t, "spiffe://cluster.local/ns/web/sa/api", time.Hour), pki.Bundle()}
		s, err := remote.New(ts.Listener.Addr().String(), spiffeid.RequireFromString(servingID), wl, dir, remote.WithLogger(discard()))
		if err != nil {
			t.Fatal(err)
		}
		if changed, err := s.Sync(context.Background()); err != nil || !changed {
			t.Fatalf("first sync: changed %v, err %v", changed, err)
		}
		data, err := os.ReadFile(s.Path())
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(string(data), "other-ns") || !strings.Contains(string(data), "only-web") {
			t.Fatalf("written documents are not web's and istio-system's only:\n%s", data)
		}
		// The mirrored DestinationRule's host (api.web.svc.cluster.local)
		// needs no address here: nothing is resolved, no DNS query leaves.
		noDNS := policy.WithResolver(func(context.Context, string) ([]netip.Addr, error) { return nil, nil })
		store, err := policy.NewStore(dir, policy.Workload{Namespace: "web", Labels: map[string]string{"app": "api"}}, policy.WithLogger(discard()), noDNS)
		if err != nil {
			t.Fatalf("policy store on the written file: %v\n%s", err, data)
		}
		if got := store.Current().InboundMode(8080); got != policy.ModeStrict {
			t.Errorf("port 8080 mode %v, want STRICT from the mirrored PeerAuthentication", got)
		}
	})

	t.Run("without the ClusterRole it names the missing permission", func(t *testing.T) {
		m := run(t, c.ServiceAccountKubeconfig(t, "istio-system", "no-role"))
		e2eutil.Eventually(t, "forbidden reported", 30*time.Second, func() error {
			err := m.Current().Err
			if err == nil {
				return errors.New("mirror synced without permission")
			}
			for _, want := range []string{"forbidden", "list peerauthentications.security.istio.io", "ClusterRole meshproxy-ca-istio-config", "system:serviceaccount:istio-system:no-role"} {
				if !strings.Contains(err.Error(), want) {
					return fmt.Errorf("error %q does not say %q", err, want)
				}
			}
			return nil
		})
		if !errors.Is(m.Current().Err, mirror.ErrNotReady) {
			t.Errorf("error %v does not wrap ErrNotReady", m.Current().Err)
		}
	})

	// Each verb of the shipped role is needed: without watch the mirror
	// lists once and then reports the watch refused.
	t.Run("list without watch is not enough", func(t *testing.T) {
		kc := c.ServiceAccountKubeconfig(t, "istio-system", "list-only")
		c.Apply(t, []byte(`apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: istio-list-only
rules:
- apiGroups: ["security.istio.io", "networking.istio.io"]
  resources: ["*"]
  verbs: ["list"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: istio-list-only
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: istio-list-only
subjects:
- kind: ServiceAccount
  name: list-only
  namespace: istio-system
`))
		api, err := authn.KubeconfigAPI(kc)
		if err != nil {
			t.Fatal(err)
		}
		defer api.CloseIdleConnections()
		logs := &e2eutil.Buffer{}
		m := mirror.New(api, mirror.WithLogger(slog.New(slog.NewTextHandler(logs, nil))), mirror.WithResources(mirror.Resources[0]))
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() { _ = m.Run(ctx); close(done) }()
		defer func() { cancel(); <-done }()
		e2eutil.Eventually(t, "watch refusal logged", 30*time.Second, func() error {
			if !strings.Contains(logs.String(), "forbidden: watch peerauthentications.security.istio.io") {
				return fmt.Errorf("logs:\n%s", logs)
			}
			return nil
		})
	})
}
