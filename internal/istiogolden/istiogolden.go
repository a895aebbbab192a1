// Package istiogolden reads testdata/istio/golden-tcp.json: Istio's own
// AuthorizationPolicy inputs for TCP traffic, and the connections Istio
// allows or denies under each, for the tests of the policy package and of
// the sidecar binary.
package istiogolden

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"sigs.k8s.io/yaml"

	"github.com/meshproxy/meshproxy/internal/manifest"
)

// Case is one input and the connections to check under it.
type Case struct {
	Name string `json:"name"`
	// Input is the YAML file, relative to testdata/istio.
	Input string `json:"input"`
	// Rules, when set, keeps only these rules (0-based) of the input's
	// policy, so one rule's meaning is checked alone.
	Rules []int `json:"rules"`
	// Replace maps Istio's example addresses onto loopback ones.
	Replace   map[string]string `json:"replace"`
	Namespace string            `json:"namespace"`
	Labels    map[string]string `json:"labels"`
	// Result is what `meshproxy check` reports for the first document.
	Result      string       `json:"result"`
	Connections []Connection `json:"connections"`
	// YAML is the prepared input.
	YAML []byte `json:"-"`
}

// Connection is one connection and Istio's verdict.
type Connection struct {
	Peer    string `json:"peer"`   // SPIFFE ID, "" for plaintext
	Source  string `json:"source"` // source IP, default 127.0.0.1
	Port    uint16 `json:"port"`
	Allowed bool   `json:"allowed"`
}

// SourceIP is the connection's source address.
func (c Connection) SourceIP() string {
	if c.Source == "" {
		return "127.0.0.1"
	}
	return c.Source
}

// Load reads the cases; dir is testdata/istio.
func Load(dir string) ([]Case, error) {
	raw, err := os.ReadFile(filepath.Join(dir, "golden-tcp.json"))
	if err != nil {
		return nil, err
	}
	var f struct {
		Cases []Case `json:"cases"`
	}
	if err := json.Unmarshal(raw, &f); err != nil {
		return nil, fmt.Errorf("golden-tcp.json: %w", err)
	}
	for i := range f.Cases {
		c := &f.Cases[i]
		if c.YAML, err = prepare(dir, c); err != nil {
			return nil, fmt.Errorf("%s: %w", c.Name, err)
		}
	}
	return f.Cases, nil
}

func prepare(dir string, c *Case) ([]byte, error) {
	data, err := os.ReadFile(filepath.Join(dir, c.Input))
	if err != nil {
		return nil, err
	}
	text := string(data)
	keys := make([]string, 0, len(c.Replace))
	for k := range c.Replace {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool { return len(keys[i]) > len(keys[j]) })
	for _, k := range keys {
		text = strings.ReplaceAll(text, k, c.Replace[k])
	}
	if c.Rules == nil {
		return []byte(text), nil
	}
	parts := manifest.Split([]byte(text))
	if len(parts) != 1 {
		return nil, fmt.Errorf("rules: the input has %d documents, want 1", len(parts))
	}
	var obj map[string]any
	if err := yaml.Unmarshal(parts[0].Data, &obj); err != nil {
		return nil, err
	}
	spec, _ := obj["spec"].(map[string]any)
	all, _ := spec["rules"].([]any)
	var keep []any
	for _, i := range c.Rules {
		if i < 0 || i >= len(all) {
			return nil, fmt.Errorf("rules: no rule %d", i)
		}
		keep = append(keep, all[i])
	}
	spec["rules"] = keep
	return yaml.Marshal(obj)
}
