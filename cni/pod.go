package cni

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"

	"github.com/meshproxy/meshproxy/ca/authn"
)

// Pod is what the plugin needs of a pod: its UID and annotations.
type Pod struct {
	UID         string
	Annotations map[string]string
}

// PodSource reads pods.
type PodSource interface {
	Pod(ctx context.Context, namespace, name string) (Pod, error)
}

// maxPodBytes bounds the API server's answer (a pod object).
const maxPodBytes = 4 << 20

// APIPods reads pods from the API server with plain HTTPS, with the
// credentials of a kubeconfig (the node agent's service account).
type APIPods struct{ api *authn.KubeAPI }

// NewAPIPods connects to the API server of the kubeconfig at path.
func NewAPIPods(kubeconfig string) (*APIPods, error) {
	api, err := authn.KubeconfigAPI(kubeconfig)
	if err != nil {
		return nil, err
	}
	return &APIPods{api: api}, nil
}

// Pod implements PodSource: GET /api/v1/namespaces/NS/pods/NAME.
func (a *APIPods) Pod(ctx context.Context, namespace, name string) (Pod, error) {
	path := "/api/v1/namespaces/" + url.PathEscape(namespace) + "/pods/" + url.PathEscape(name)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, path, nil)
	if err != nil {
		return Pod{}, fmt.Errorf("get pod %s/%s: %w", namespace, name, err)
	}
	req.Header.Set("Accept", "application/json")
	resp, err := a.api.Do(req)
	if err != nil {
		return Pod{}, fmt.Errorf("get pod %s/%s from %s: %w", namespace, name, a.api.Server(), err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxPodBytes+1))
	if err != nil {
		return Pod{}, fmt.Errorf("get pod %s/%s: read answer: %w", namespace, name, err)
	}
	if resp.StatusCode != http.StatusOK {
		return Pod{}, fmt.Errorf("get pod %s/%s from %s: %s: %.200s", namespace, name, a.api.Server(), resp.Status, body)
	}
	if len(body) > maxPodBytes {
		return Pod{}, fmt.Errorf("get pod %s/%s: answer larger than %d bytes", namespace, name, maxPodBytes)
	}
	var obj struct {
		Metadata struct {
			Namespace   string            `json:"namespace"`
			Name        string            `json:"name"`
			UID         string            `json:"uid"`
			Annotations map[string]string `json:"annotations"`
		} `json:"metadata"`
	}
	if err := json.Unmarshal(body, &obj); err != nil {
		return Pod{}, fmt.Errorf("get pod %s/%s: decode: %w", namespace, name, err)
	}
	if obj.Metadata.Namespace != namespace || obj.Metadata.Name != name {
		return Pod{}, fmt.Errorf("get pod %s/%s: API server answered with pod %s/%s", namespace, name, obj.Metadata.Namespace, obj.Metadata.Name)
	}
	return Pod{UID: obj.Metadata.UID, Annotations: obj.Metadata.Annotations}, nil
}
