package certmanagerint

import (
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/meshproxy/meshproxy/internal/e2eutil"
)

// Versions of what the test runs.
const (
	kubeVersion        = "v1.37.2"
	certManagerVersion = "v1.21.2"
	// certManagerModuleDir is test/certmanager, relative to this package.
	certManagerModuleDir = "../certmanager"
)

// bins are the programs the tests run, found or built by TestMain.
var bins struct {
	meshproxy, etcd, apiserver, certManager, crds string
	missing                                       string // why the cluster cannot run, if it cannot
}

func TestMain(m *testing.M) {
	flag.Parse()
	if !testing.Short() {
		if err := findBinaries(); err != nil {
			fmt.Fprintf(os.Stderr, "certmanagerint: %v\n", err)
			os.Exit(1)
		}
	}
	e2eutil.Main(m, "certmanagerint", &bins.meshproxy)
}

func cacheDir() string {
	if d := os.Getenv("MESHPROXY_CACHE"); d != "" {
		return d
	}
	home, _ := os.UserHomeDir()
	return filepath.Join(home, ".cache", "meshproxy")
}

// findBinaries locates etcd and kube-apiserver and builds cert-manager's
// controller into the cache when it is not there yet.
func findBinaries() error {
	cache := cacheDir()
	bins.apiserver = filepath.Join(cache, "k8s-"+kubeVersion, "bin", "kube-apiserver")
	if _, err := os.Stat(bins.apiserver); err != nil {
		bins.missing = fmt.Sprintf("kube-apiserver %s is not built at %s (build it with the test/cluster tools module)", kubeVersion, bins.apiserver)
	}
	etcd, err := exec.LookPath("etcd")
	if err != nil {
		bins.missing = "etcd is not on PATH (install Debian's etcd-server)"
	}
	bins.etcd = etcd
	dir := filepath.Join(cache, "cert-manager-"+certManagerVersion)
	bins.certManager = filepath.Join(dir, "cert-manager-controller")
	bins.crds = filepath.Join(dir, "crds")
	if stale(bins.certManager, filepath.Join(certManagerModuleDir, "main.go"), filepath.Join(certManagerModuleDir, "go.sum")) {
		fmt.Fprintf(os.Stderr, "certmanagerint: building cert-manager %s's controller into %s\n", certManagerVersion, dir)
		cmd := exec.Command("go", "build", "-trimpath", "-o", bins.certManager, ".")
		cmd.Dir, cmd.Env = certManagerModuleDir, append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("build cert-manager controller: %w\n%s", err, out)
		}
	}
	if _, err := os.Stat(bins.crds); err != nil {
		cmd := exec.Command("go", "list", "-m", "-f", "{{.Dir}}", "github.com/cert-manager/cert-manager")
		cmd.Dir = certManagerModuleDir
		out, err := cmd.Output()
		if err != nil {
			return fmt.Errorf("find cert-manager's module: %w", err)
		}
		src := filepath.Join(string(out[:len(out)-1]), "deploy", "crds")
		if err := os.MkdirAll(bins.crds, 0o755); err != nil {
			return err
		}
		files, err := filepath.Glob(filepath.Join(src, "*.yaml"))
		if err != nil || len(files) == 0 {
			return fmt.Errorf("no CRDs in %s", src)
		}
		for _, f := range files {
			data, err := os.ReadFile(f)
			if err != nil {
				return err
			}
			if err := os.WriteFile(filepath.Join(bins.crds, filepath.Base(f)), data, 0o644); err != nil {
				return err
			}
		}
	}
	return nil
}

// stale reports whether bin is missing or older than one of its sources.
func stale(bin string, sources ...string) bool {
	b, err := os.Stat(bin)
	if err != nil {
		return true
	}
	for _, src := range sources {
		if s, err := os.Stat(src); err != nil || s.ModTime().After(b.ModTime()) {
			return true
		}
	}
	return false
}
