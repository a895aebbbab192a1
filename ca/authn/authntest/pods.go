package authntest

import (
	"encoding/json"
	"net/http"
	"strings"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
)

// AddPod makes the server answer GET /api/v1/namespaces/NS/pods/NAME (for
// the reviewer's bearer token) with a pod of that uid and those annotations.
func (s *APIServer) AddPod(namespace, name, uid string, annotations map[string]string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.pods == nil {
		s.pods = map[string]corev1.Pod{}
	}
	s.pods[namespace+"/"+name] = corev1.Pod{
		TypeMeta:   metav1.TypeMeta{APIVersion: "v1", Kind: "Pod"},
		ObjectMeta: metav1.ObjectMeta{Namespace: namespace, Name: name, UID: types.UID(uid), Annotations: annotations},
	}
}

// servePod answers a pod GET; it reports false for other requests.
func (s *APIServer) servePod(w http.ResponseWriter, r *http.Request) bool {
	parts := strings.Split(strings.TrimPrefix(r.URL.Path, "/"), "/")
	if len(parts) != 6 || parts[0] != "api" || parts[1] != "v1" || parts[2] != "namespaces" || parts[4] != "pods" {
		return false
	}
	switch {
	case r.Method != http.MethodGet:
		writeStatus(w, http.StatusMethodNotAllowed, "MethodNotAllowed", "only GET is served for pods")
		return true
	case r.Header.Get("Authorization") != "Bearer "+s.ReviewerToken:
		writeStatus(w, http.StatusUnauthorized, "Unauthorized", "Unauthorized")
		return true
	}
	s.mu.Lock()
	pod, ok := s.pods[parts[3]+"/"+parts[5]]
	s.mu.Unlock()
	if !ok {
		writeStatus(w, http.StatusNotFound, "NotFound", `pods "`+parts[5]+`" not found`)
		return true
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(&pod)
	return true
}
