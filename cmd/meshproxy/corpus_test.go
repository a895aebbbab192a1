package main

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"

	"github.com/meshproxy/meshproxy/internal/manifest"
	"github.com/meshproxy/meshproxy/policy"
)

// corpusManifest is testdata/istio/manifest.json: where each document of
// the corpus came from and what Istio itself makes of it.
type corpusManifest struct {
	Files []corpusFile `json:"files"`
}

type corpusFile struct {
	File       string `json:"file"` // under testdata/istio
	Repository string `json:"repository"`
	Commit     string `json:"commit"`
	Path       string `json:"path"`
	// Expect is what Istio does with every document of the file:
	// "accepted" or "rejected" (its validation refuses it).
	Expect string `json:"expect"`
	// Documents overrides Expect for single documents, by "Kind/name":
	// the features meshproxy rejects on purpose, with the reason.
	Documents map[string]corpusDocument `json:"documents,omitempty"`
}

type corpusDocument struct {
	Expect string `json:"expect"`
	Reason string `json:"reason"` // what meshproxy's message must say
	// Istio, for a document Istio's own validation (or the Kubernetes API
	// server) refuses although it sits among accepted ones (Istio's
	// analyzer test data), says which rule.
	Istio string `json:"istio,omitempty"`
	// Bound is what a VirtualService's result must be when its file is
	// loaded whole by the gateway ("rejected" for one Istio's validation
	// refuses although the analyzer test data it sits in is not validated);
	// checked alone it is not bound, so ignored.
	Bound string `json:"bound,omitempty"`
}

// corpusKinds are the five Istio kinds meshproxy reads, by role.
var corpusKinds = map[string]string{
	"PeerAuthentication": "sidecar", "AuthorizationPolicy": "sidecar", "DestinationRule": "sidecar",
	"Gateway": "gateway", "VirtualService": "gateway",
}

// TestIstioCorpus runs every document of the corpus of real Istio
// configuration through `meshproxy check`, each alone (as Istio validates
// them): what Istio accepts is applied, warned or dry-run, except the
// features the manifest names as rejected on purpose; what Istio's
// validation refuses is rejected.
func TestIstioCorpus(t *testing.T) {
	root := filepath.Join("..", "..", "testdata", "istio")
	raw, err := os.ReadFile(filepath.Join(root, "manifest.json"))
	if err != nil {
		t.Fatal(err)
	}
	var m corpusManifest
	if err := json.Unmarshal(raw, &m); err != nil {
		t.Fatalf("manifest.json: %v", err)
	}
	tmp := t.TempDir()
	counts := map[string]int{}
	for _, f := range m.Files {
		if f.Repository == "" || len(f.Commit) != 40 || f.Path == "" || (f.Expect != "accepted" && f.Expect != "rejected") {
			t.Errorf("%s: manifest entry without repository, commit, path or expect", f.File)
			continue
		}
		data, err := os.ReadFile(filepath.Join(root, f.File))
		if err != nil {
			t.Error(err)
			continue
		}
		for _, part := range manifest.Split(data) {
			var head struct {
				APIVersion string `json:"apiVersion"`
				Kind       string `json:"kind"`
				Metadata   struct {
					Name string `json:"name"`
				} `json:"metadata"`
			}
			j, err := yaml.YAMLToJSON(part.Data)
			if err != nil || json.Unmarshal(j, &head) != nil {
				continue // not an object: nothing meshproxy reads
			}
			role, ok := corpusKinds[head.Kind]
			if group, _, _ := strings.Cut(head.APIVersion, "/"); !ok || (group != "security.istio.io" && group != "networking.istio.io") {
				continue // another API's kind of the same name (Kubernetes Gateway API)
			}
			expect, reason := f.Expect, ""
			if d, ok := f.Documents[head.Kind+"/"+head.Metadata.Name]; ok {
				expect, reason = d.Expect, d.Reason
			}
			name := fmt.Sprintf("%s#%d", f.File, part.Index)
			one := filepath.Join(tmp, "doc.yaml")
			if err := os.WriteFile(one, part.Data, 0o644); err != nil {
				t.Fatal(err)
			}
			code, out, msg := checkExec(t, "-f", one, "--for", role, "-o", "json")
			var docs []checkDocument
			if err := json.Unmarshal([]byte(out), &docs); err != nil || len(docs) != 1 {
				t.Errorf("%s: check exit %d (%s), output %q", name, code, msg, out)
				continue
			}
			got := docs[0]
			counts[head.Kind+" "+got.Result]++
			rejected := got.Result == "rejected"
			if rejected != (expect == "rejected") || rejected != (code == 1) {
				t.Errorf("%s (%s %s): %s (exit %d), Istio: %s %s\n  messages: %+v", name, got.Kind, got.Name, got.Result, code, expect, reason, got.Messages)
			}
			if rejected && reason != "" && !messagesMention(got.Messages, reason) {
				t.Errorf("%s: rejected, but not for %q: %+v", name, reason, got.Messages)
			}
		}
	}
	t.Logf("corpus results: %v", counts)
	t.Logf("VirtualServices bound to a Gateway of their file: %d", checkCorpusGatewayFiles(t, root, m))
}

// checkCorpusGatewayFiles runs every corpus file that holds a Gateway and a
// VirtualService, each name once, through `meshproxy check --for gateway`
// whole, as a gateway would load it: a VirtualService checked alone is not
// bound to any Gateway and so is ignored, not validated. What Istio accepts
// must not be rejected here either. It returns how many VirtualServices
// were bound, so validated.
func checkCorpusGatewayFiles(t *testing.T, root string, m corpusManifest) int {
	bound := 0
	for _, f := range m.Files {
		data, err := os.ReadFile(filepath.Join(root, f.File))
		if err != nil {
			t.Error(err)
			continue
		}
		kinds, seen, unique := map[string]int{}, map[string]bool{}, true
		for _, part := range manifest.Split(data) {
			var head struct {
				APIVersion string `json:"apiVersion"`
				Kind       string `json:"kind"`
				Metadata   struct {
					Name, Namespace string
				} `json:"metadata"`
			}
			j, err := yaml.YAMLToJSON(part.Data)
			if err != nil || json.Unmarshal(j, &head) != nil || !strings.HasPrefix(head.APIVersion, "networking.istio.io/") {
				continue
			}
			key := head.Kind + "/" + head.Metadata.Namespace + "/" + head.Metadata.Name
			unique = unique && !seen[key]
			seen[key] = true
			kinds[head.Kind]++
		}
		if f.Expect != "accepted" || !unique || kinds["Gateway"] == 0 || kinds["VirtualService"] == 0 {
			continue
		}
		_, out, msg := checkExec(t, "-f", filepath.Join(root, f.File), "--for", "gateway", "-o", "json")
		var docs []checkDocument
		if err := json.Unmarshal([]byte(out), &docs); err != nil {
			t.Errorf("%s: check --for gateway: %v (%s)", f.File, err, msg)
			continue
		}
		for _, d := range docs {
			if d.Kind != "VirtualService" && d.Kind != "Gateway" {
				continue
			}
			if d.Kind == "VirtualService" && !messagesMention(d.Messages, "not bound to a Gateway of this gateway") {
				bound++
			}
			want := f.Documents[d.Kind+"/"+d.Name]
			if (d.Result == "rejected") != (want.Expect == "rejected" || want.Bound == "rejected") {
				t.Errorf("%s (whole file, --for gateway): %s %s/%s %s, Istio: %s %s %s: %+v", f.File, d.Kind, d.Namespace, d.Name, d.Result,
					want.Expect, want.Bound, want.Istio, d.Messages)
			}
		}
	}
	return bound
}

func messagesMention(ms []policy.Message, s string) bool {
	for _, m := range ms {
		if strings.Contains(m.Field+": "+m.Message, s) {
			return true
		}
	}
	return false
}
