package deploy

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"
)

func TestKindScriptsPassShellcheck(t *testing.T) {
	scripts, err := filepath.Glob("kind/*.sh")
	if err != nil || len(scripts) < 2 {
		t.Fatalf("kind scripts: %v %v", scripts, err)
	}
	for _, s := range scripts {
		data, err := os.ReadFile(s)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.HasPrefix(string(data), "#!/usr/bin/env bash\n") || !strings.Contains(string(data), "\nset -euo pipefail\n") {
			t.Errorf("%s: want a bash shebang and set -euo pipefail", s)
		}
		if fi, err := os.Stat(s); err != nil || fi.Mode()&0o111 == 0 {
			t.Errorf("%s: not executable", s)
		}
	}
	bin, err := exec.LookPath("shellcheck")
	if err != nil {
		t.Skip("shellcheck not installed (.ci/run installs it): scripts not linted")
	}
	out, err := exec.Command(bin, append([]string{"--shell=bash", "--external-sources"}, scripts...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("shellcheck: %v\n%s", err, out)
	}
}

// TestKindConfigMatchesDemo: the demo passes the cluster's pod and service
// ranges to inject as --mesh-cidrs, so both files must agree.
func TestKindConfigMatchesDemo(t *testing.T) {
	data, err := os.ReadFile("kind/kind-config.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var cfg struct {
		Kind       string `json:"kind"`
		APIVersion string `json:"apiVersion"`
		Name       string `json:"name"`
		Networking struct {
			PodSubnet     string `json:"podSubnet"`
			ServiceSubnet string `json:"serviceSubnet"`
		} `json:"networking"`
		Nodes []struct {
			Role string `json:"role"`
		} `json:"nodes"`
	}
	if err := yaml.UnmarshalStrict(data, &cfg); err != nil {
		t.Fatalf("kind-config.yaml: %v", err)
	}
	if cfg.Kind != "Cluster" || cfg.APIVersion != "kind.x-k8s.io/v1alpha4" {
		t.Errorf("kind-config.yaml: %s %s", cfg.APIVersion, cfg.Kind)
	}
	demo, err := os.ReadFile("kind/demo.sh")
	if err != nil {
		t.Fatal(err)
	}
	platform, err := os.ReadFile("kind/platform-kind.sh")
	if err != nil {
		t.Fatal(err)
	}
	script := append(demo, platform...)
	for _, want := range []string{
		"POD_CIDR=" + cfg.Networking.PodSubnet + "\n",
		"SVC_CIDR=" + cfg.Networking.ServiceSubnet + "\n",
		`CLUSTER="${CLUSTER:-` + cfg.Name + `}"`,
		"kind load image-archive",
		"kubectl wait", // replaced below when rollout status is used
	} {
		if want == "kubectl wait" {
			if !strings.Contains(string(script), "rollout status") && !strings.Contains(string(script), "kubectl wait") {
				t.Error("demo.sh never waits for readiness")
			}
			continue
		}
		if !strings.Contains(string(script), want) {
			t.Errorf("demo.sh and platform-kind.sh lack %q", want)
		}
	}
}
