package authntest

import (
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	authv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// ServiceAccount is a token the fake API server knows.
type ServiceAccount struct {
	Namespace, Name string
	Audiences       []string // audiences the token was minted for
	Deleted         bool     // its pod is gone: the token no longer authenticates
}

// APIServer is a fake Kubernetes API server that implements
// POST /apis/authentication.k8s.io/v1/tokenreviews the way the real one
// does: it requires the reviewer's bearer token, strictly decodes the
// TokenReview, and answers 201 with status.authenticated, user and the
// audiences the token is valid for among those requested.
type APIServer struct {
	*httptest.Server
	// ReviewerToken is the bearer token the CA must present.
	ReviewerToken string
	// IgnoreAudiences makes the server behave like an API server that does
	// not check spec.audiences: it authenticates and returns no audiences.
	IgnoreAudiences atomic.Bool
	// Reviews counts TokenReviews received.
	Reviews atomic.Int64

	mu     sync.Mutex
	tokens map[string]ServiceAccount
	jwks   []byte
	pods   map[string]corev1.Pod // ns/name, see AddPod
}

// SetJWKS makes the server answer GET /openid/v1/jwks (for authenticated
// callers) with jwks.
func (s *APIServer) SetJWKS(jwks []byte) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.jwks = jwks
}

// NewAPIServer starts a fake API server over TLS on loopback.
func NewAPIServer(t testing.TB) *APIServer {
	t.Helper()
	s := &APIServer{ReviewerToken: "reviewer-" + randHex(t, 16), tokens: map[string]ServiceAccount{}}
	s.Server = httptest.NewTLSServer(http.HandlerFunc(s.serve))
	t.Cleanup(s.Close)
	return s
}

// AddToken makes token valid for sa.
func (s *APIServer) AddToken(token string, sa ServiceAccount) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.tokens[token] = sa
}

// DeletePod marks the pod behind token deleted.
func (s *APIServer) DeletePod(token string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	sa := s.tokens[token]
	sa.Deleted = true
	s.tokens[token] = sa
}

func (s *APIServer) serve(w http.ResponseWriter, r *http.Request) {
	if s.servePod(w, r) {
		return
	}
	if r.URL.Path == "/openid/v1/jwks" && r.Method == http.MethodGet {
		s.mu.Lock()
		jwks := s.jwks
		s.mu.Unlock()
		switch {
		case r.Header.Get("Authorization") != "Bearer "+s.ReviewerToken:
			writeStatus(w, http.StatusUnauthorized, "Unauthorized", "Unauthorized")
		case jwks == nil:
			writeStatus(w, http.StatusNotFound, "NotFound", "the server could not find the requested resource")
		default:
			w.Header().Set("Content-Type", "application/jwk-set+json")
			_, _ = w.Write(jwks)
		}
		return
	}
	if r.URL.Path != "/apis/authentication.k8s.io/v1/tokenreviews" {
		writeStatus(w, http.StatusNotFound, "NotFound", "the server could not find the requested resource")
		return
	}
	if r.Method != http.MethodPost {
		writeStatus(w, http.StatusMethodNotAllowed, "MethodNotAllowed", "only POST is allowed")
		return
	}
	if r.Header.Get("Authorization") != "Bearer "+s.ReviewerToken {
		writeStatus(w, http.StatusUnauthorized, "Unauthorized", "Unauthorized")
		return
	}
	if ct := r.Header.Get("Content-Type"); !strings.HasPrefix(ct, "application/json") {
		writeStatus(w, http.StatusUnsupportedMediaType, "UnsupportedMediaType", fmt.Sprintf("the body of the request was in an unknown format: %s", ct))
		return
	}
	var review authv1.TokenReview
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<20))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&review); err != nil {
		writeStatus(w, http.StatusBadRequest, "BadRequest", err.Error())
		return
	}
	if review.APIVersion != "authentication.k8s.io/v1" || review.Kind != "TokenReview" {
		writeStatus(w, http.StatusBadRequest, "BadRequest", fmt.Sprintf("wrong apiVersion/kind %q/%q", review.APIVersion, review.Kind))
		return
	}
	s.Reviews.Add(1)
	s.mu.Lock()
	sa, known := s.tokens[review.Spec.Token]
	s.mu.Unlock()

	out := authv1.TokenReview{
		TypeMeta: metav1.TypeMeta{APIVersion: "authentication.k8s.io/v1", Kind: "TokenReview"},
		Spec:     review.Spec,
	}
	switch {
	case !known:
		out.Status.Error = "[invalid bearer token, square/go-jose: error in cryptographic primitive]"
	case sa.Deleted:
		out.Status.Error = fmt.Sprintf("[invalid bearer token, pods %q not found]", sa.Name+"-pod")
	case s.IgnoreAudiences.Load():
		out.Status.Authenticated = true
	default:
		var granted []string
		for _, a := range review.Spec.Audiences {
			if slices.Contains(sa.Audiences, a) {
				granted = append(granted, a)
			}
		}
		if len(review.Spec.Audiences) == 0 {
			granted = sa.Audiences
		}
		if len(granted) == 0 {
			out.Status.Error = "[invalid bearer token, token audiences " + fmt.Sprint(sa.Audiences) + " is invalid for the target audiences " + fmt.Sprint(review.Spec.Audiences) + "]"
			break
		}
		out.Status.Authenticated = true
		out.Status.Audiences = granted
	}
	if out.Status.Authenticated {
		out.Status.User = authv1.UserInfo{
			Username: "system:serviceaccount:" + sa.Namespace + ":" + sa.Name,
			UID:      randHexNoT(),
			Groups:   []string{"system:serviceaccounts", "system:serviceaccounts:" + sa.Namespace, "system:authenticated"},
		}
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusCreated)
	_ = json.NewEncoder(w).Encode(&out)
}

func writeStatus(w http.ResponseWriter, code int, reason, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(metav1.Status{
		TypeMeta: metav1.TypeMeta{APIVersion: "v1", Kind: "Status"},
		Status:   metav1.StatusFailure, Message: msg, Reason: metav1.StatusReason(reason), Code: int32(code),
	})
}

// CAPEM is the PEM of the server's TLS certificate, which clients must trust.
func (s *APIServer) CAPEM() []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: s.Certificate().Raw})
}

// WriteKubeconfig writes a kubeconfig for this server into dir and returns
// its path. With inline, the CA and token are embedded; otherwise they are
// files referenced by relative paths.
func (s *APIServer) WriteKubeconfig(t testing.TB, dir string, inline bool) string {
	t.Helper()
	cluster := "    certificate-authority: ca.crt\n"
	user := "    tokenFile: reviewer-token\n"
	if inline {
		cluster = "    certificate-authority-data: " + base64.StdEncoding.EncodeToString(s.CAPEM()) + "\n"
		user = "    token: " + s.ReviewerToken + "\n"
	} else {
		writeFile(t, filepath.Join(dir, "ca.crt"), s.CAPEM())
		writeFile(t, filepath.Join(dir, "reviewer-token"), []byte(s.ReviewerToken+"\n"))
	}
	kc := "apiVersion: v1\nkind: Config\ncurrent-context: test\n" +
		"clusters:\n- name: test-cluster\n  cluster:\n    server: " + s.URL + "\n" + cluster +
		"contexts:\n- name: other\n  context:\n    cluster: nowhere\n    user: nobody\n" +
		"- name: test\n  context:\n    cluster: test-cluster\n    user: ca\n" +
		"users:\n- name: ca\n  user:\n" + user
	path := filepath.Join(dir, "kubeconfig")
	writeFile(t, path, []byte(kc))
	return path
}

// WriteServiceAccountDir writes the in-cluster files (token, ca.crt) into
// dir and returns the KUBERNETES_SERVICE_HOST/PORT values for this server.
func (s *APIServer) WriteServiceAccountDir(t testing.TB, dir string) (host, port string) {
	t.Helper()
	writeFile(t, filepath.Join(dir, "ca.crt"), s.CAPEM())
	writeFile(t, filepath.Join(dir, "token"), []byte(s.ReviewerToken))
	addr := s.Listener.Addr().String()
	i := strings.LastIndex(addr, ":")
	return addr[:i], addr[i+1:]
}

func writeFile(t testing.TB, path string, data []byte) {
	t.Helper()
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatalf("authntest: %v", err)
	}
}
