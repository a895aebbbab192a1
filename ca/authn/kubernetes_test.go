package authn

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshproxy/meshproxy/ca/authn/authntest"
)

var clusterLocal = spiffeid.RequireTrustDomainFromString("cluster.local")

func TestKubernetesTokenReview(t *testing.T) {
	api := authntest.NewAPIServer(t)
	api.AddToken("good", authntest.ServiceAccount{Namespace: "demo", Name: "client", Audiences: []string{"istio-ca"}})
	api.AddToken("multi-aud", authntest.ServiceAccount{Namespace: "demo", Name: "server", Audiences: []string{"api", "istio-ca"}})
	api.AddToken("wrong-aud", authntest.ServiceAccount{Namespace: "demo", Name: "client", Audiences: []string{"https://kubernetes.default.svc"}})
	api.AddToken("deleted", authntest.ServiceAccount{Namespace: "demo", Name: "gone", Audiences: []string{"istio-ca"}})
	api.DeletePod("deleted")

	kc, err := KubeconfigAPI(api.WriteKubeconfig(t, t.TempDir(), true))
	if err != nil {
		t.Fatal(err)
	}
	k := NewKubernetes(kc, clusterLocal, WithLogger(quietLogger()))
	tests := []struct {
		name    string
		token   string
		want    string
		wantErr error
		errText string
	}{
		{"authenticated", "good", "spiffe://cluster.local/ns/demo/sa/client", nil, ""},
		{"audience among several", "multi-aud", "spiffe://cluster.local/ns/demo/sa/server", nil, ""},
		{"unknown token", "forged", "", ErrUnauthenticated, "invalid bearer token"},
		{"wrong audience", "wrong-aud", "", ErrUnauthenticated, "audiences"},
		{"deleted pod", "deleted", "", ErrUnauthenticated, "not found"},
		{"no token", "", "", ErrNoCredentials, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			id, err := k.Authenticate(context.Background(), Caller{Token: tt.token})
			if tt.wantErr != nil {
				if !errors.Is(err, tt.wantErr) || !strings.Contains(err.Error(), tt.errText) {
					t.Fatalf("err = %v, want %v mentioning %q", err, tt.wantErr, tt.errText)
				}
				return
			}
			if err != nil || id.String() != tt.want {
				t.Fatalf("got %v, %v; want %s", id, err, tt.want)
			}
		})
	}
	if n := api.Reviews.Load(); n != 5 {
		t.Errorf("API server saw %d reviews, want 5 (no review without a token)", n)
	}
}

func TestKubernetesRequiresAudienceInStatus(t *testing.T) {
	// An API server that ignores spec.audiences authenticates any valid
	// token but returns no audiences: that is not proof of "istio-ca".
	api := authntest.NewAPIServer(t)
	api.AddToken("good", authntest.ServiceAccount{Namespace: "demo", Name: "client", Audiences: []string{"other"}})
	api.IgnoreAudiences.Store(true)
	kc, err := KubeconfigAPI(api.WriteKubeconfig(t, t.TempDir(), true))
	if err != nil {
		t.Fatal(err)
	}
	_, err = NewKubernetes(kc, clusterLocal).Authenticate(context.Background(), Caller{Token: "good"})
	if !errors.Is(err, ErrUnauthenticated) || !strings.Contains(err.Error(), `audience "istio-ca"`) {
		t.Fatalf("err = %v, want Unauthenticated for the missing audience", err)
	}
}

func TestKubernetesReviewerCredentialsRejectedIsUnavailable(t *testing.T) {
	api := authntest.NewAPIServer(t)
	api.AddToken("good", authntest.ServiceAccount{Namespace: "demo", Name: "client", Audiences: []string{"istio-ca"}})
	dir := t.TempDir()
	path := api.WriteKubeconfig(t, dir, false)
	if err := os.WriteFile(filepath.Join(dir, "reviewer-token"), []byte("stale"), 0o600); err != nil {
		t.Fatal(err)
	}
	kc, err := KubeconfigAPI(path)
	if err != nil {
		t.Fatal(err)
	}
	k := NewKubernetes(kc, clusterLocal, WithLogger(quietLogger()))
	_, err = k.Authenticate(context.Background(), Caller{Token: "good"})
	if !errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), "401") {
		t.Fatalf("err = %v, want Unavailable naming the 401", err)
	}
	// The reviewer token file is re-read per request (projected tokens rotate).
	if err := os.WriteFile(filepath.Join(dir, "reviewer-token"), []byte(api.ReviewerToken), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := k.Authenticate(context.Background(), Caller{Token: "good"}); err != nil {
		t.Fatalf("after fixing the reviewer token: %v", err)
	}
}

func TestKubernetesUnreachableIsUnavailable(t *testing.T) {
	api := authntest.NewAPIServer(t)
	kc, err := KubeconfigAPI(api.WriteKubeconfig(t, t.TempDir(), true))
	if err != nil {
		t.Fatal(err)
	}
	api.Close()
	_, err = NewKubernetes(kc, clusterLocal).Authenticate(context.Background(), Caller{Token: "x"})
	if !errors.Is(err, ErrUnavailable) {
		t.Fatalf("err = %v, want Unavailable", err)
	}
}

func TestInClusterAPI(t *testing.T) {
	api := authntest.NewAPIServer(t)
	api.AddToken("good", authntest.ServiceAccount{Namespace: "demo", Name: "client", Audiences: []string{"istio-ca"}})
	dir := t.TempDir()
	host, port := api.WriteServiceAccountDir(t, dir)
	env := map[string]string{"KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": port}
	kc, err := inClusterAPI(func(k string) string { return env[k] }, dir)
	if err != nil {
		t.Fatal(err)
	}
	id, err := NewKubernetes(kc, clusterLocal).Authenticate(context.Background(), Caller{Token: "good"})
	if err != nil || id.String() != "spiffe://cluster.local/ns/demo/sa/client" {
		t.Fatalf("got %v, %v", id, err)
	}
	if _, err := inClusterAPI(func(string) string { return "" }, dir); err == nil || !strings.Contains(err.Error(), "KUBERNETES_SERVICE_HOST") {
		t.Fatalf("outside a cluster: err = %v", err)
	}
}

func TestKubeconfigFileReferencesAndErrors(t *testing.T) {
	api := authntest.NewAPIServer(t)
	api.AddToken("good", authntest.ServiceAccount{Namespace: "demo", Name: "client", Audiences: []string{"istio-ca"}})
	dir := t.TempDir()
	kc, err := KubeconfigAPI(api.WriteKubeconfig(t, dir, false))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := NewKubernetes(kc, clusterLocal).Authenticate(context.Background(), Caller{Token: "good"}); err != nil {
		t.Fatalf("kubeconfig with relative file references: %v", err)
	}

	tests := []struct {
		name, content, want string
	}{
		{"not yaml", "{{{", "kubeconfig"},
		{"no context", "apiVersion: v1\nkind: Config\n", "no current-context"},
		{"unknown context", "current-context: x\n", `context "x" not found`},
		{"insecure", "current-context: c\ncontexts:\n- name: c\n  context: {cluster: k, user: u}\nclusters:\n- name: k\n  cluster: {server: 'https://127.0.0.1:1', insecure-skip-tls-verify: true}\n", "insecure-skip-tls-verify"},
		{"exec user", "current-context: c\ncontexts:\n- name: c\n  context: {cluster: k, user: u}\nclusters:\n- name: k\n  cluster: {server: 'https://127.0.0.1:1'}\nusers:\n- name: u\n  user: {exec: {command: aws}}\n", "exec"},
		{"plain http", "current-context: c\ncontexts:\n- name: c\n  context: {cluster: k, user: u}\nclusters:\n- name: k\n  cluster: {server: 'http://127.0.0.1:1'}\nusers:\n- name: u\n  user: {token: t}\n", "https"},
		{"missing ca file", "current-context: c\ncontexts:\n- name: c\n  context: {cluster: k, user: u}\nclusters:\n- name: k\n  cluster: {server: 'https://127.0.0.1:1', certificate-authority: nope.crt}\nusers:\n- name: u\n  user: {token: t}\n", "nope.crt"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "kubeconfig")
			if err := os.WriteFile(path, []byte(tt.content), 0o600); err != nil {
				t.Fatal(err)
			}
			_, err := KubeconfigAPI(path)
			if err == nil || !strings.Contains(err.Error(), tt.want) || !strings.Contains(err.Error(), "kubeconfig") {
				t.Fatalf("err = %v, want it to mention %q", err, tt.want)
			}
		})
	}
}
