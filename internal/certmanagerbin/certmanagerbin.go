// Package certmanagerbin finds, building it when missing or stale,
// cert-manager's controller that the Kubernetes tools module
// (test/cluster/tools/certmanager) builds from cert-manager's Go module,
// and cert-manager's CRDs from the same module, in the cache directory both
// the loopback cert-manager test (test/certmanagerint) and the cluster suite
// (test/cluster) use. It is for tests only.
package certmanagerbin

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/meshproxy/meshproxy/internal/kubetest"
	"github.com/meshproxy/meshproxy/internal/testtools"
)

// Version is the cert-manager release test/cluster/tools/go.mod requires.
const Version = "v1.21.2"

// Binaries are the built controller and the directory of CRD manifests.
type Binaries struct {
	// Controller is the cert-manager-controller executable.
	Controller string
	// CRDs holds cert-manager's deploy/crds/*.yaml.
	CRDs string
}

// Find returns the controller and CRDs under testtools.CacheDir(). toolsDir is
// test/cluster/tools: its build.sh builds the controller beside Kubernetes
// and CoreDNS (one module, so the Kubernetes libraries all three use compile
// once) when any is missing or was built from other sources — a no-op once
// `make cluster-tools` ran. The CRDs are copied out of the module cache when
// they are not there yet.
func Find(toolsDir string) (Binaries, error) {
	dir := filepath.Join(testtools.CacheDir(), "cert-manager-"+Version)
	b := Binaries{
		Controller: filepath.Join(kubetest.BinDir(), "cert-manager-controller"),
		CRDs:       filepath.Join(dir, "crds"),
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return b, fmt.Errorf("cert-manager cache: %w", err)
	}
	build := exec.Command(filepath.Join(toolsDir, "build.sh"))
	build.Env = append(os.Environ(), "MESHPROXY_CACHE="+testtools.CacheDir())
	if out, err := build.CombinedOutput(); err != nil {
		return b, fmt.Errorf("build the cluster tools (cert-manager's controller): %w\n%s", err, out)
	}
	if _, err := os.Stat(b.Controller); err != nil {
		return b, fmt.Errorf("%s did not build cert-manager's controller: %w", build.Path, err)
	}
	if _, err := os.Stat(b.CRDs); err == nil {
		return b, nil
	}
	cmd := exec.Command("go", "list", "-m", "-f", "{{.Dir}}", "github.com/cert-manager/cert-manager")
	cmd.Dir = toolsDir
	out, err := cmd.Output()
	if err != nil {
		return b, fmt.Errorf("find cert-manager's module: %w", err)
	}
	src := filepath.Join(strings.TrimSpace(string(out)), "deploy", "crds")
	files, err := filepath.Glob(filepath.Join(src, "*.yaml"))
	if err != nil || len(files) == 0 {
		return b, fmt.Errorf("no CRDs in %s", src)
	}
	// Copied into a temporary directory renamed into place, so a reader
	// never sees half of them.
	tmp, err := os.MkdirTemp(dir, "crds-")
	if err != nil {
		return b, fmt.Errorf("copy CRDs: %w", err)
	}
	defer os.RemoveAll(tmp)
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			return b, fmt.Errorf("copy CRDs: %w", err)
		}
		if err := os.WriteFile(filepath.Join(tmp, filepath.Base(f)), data, 0o644); err != nil {
			return b, fmt.Errorf("copy CRDs: %w", err)
		}
	}
	if err := os.Chmod(tmp, 0o755); err != nil {
		return b, fmt.Errorf("copy CRDs: %w", err)
	}
	if err := os.Rename(tmp, b.CRDs); err != nil && !os.IsExist(err) {
		if _, statErr := os.Stat(b.CRDs); statErr != nil {
			return b, fmt.Errorf("copy CRDs: %w", err)
		}
	}
	return b, nil
}
