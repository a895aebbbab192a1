package certmanagerint

import (
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/meshproxy/meshproxy/internal/certmanagerbin"
	"github.com/meshproxy/meshproxy/internal/e2eutil"
	"github.com/meshproxy/meshproxy/internal/kubetest"
)

// toolsDir is test/cluster/tools, relative to this package: its build.sh
// builds kube-apiserver and cert-manager's controller.
const toolsDir = "../cluster/tools"

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

// findBinaries locates etcd, and kube-apiserver and cert-manager's
// controller, built into the cache when they are not there yet.
func findBinaries() error {
	cm, err := certmanagerbin.Find(toolsDir)
	if err != nil {
		return err
	}
	bins.certManager, bins.crds = cm.Controller, cm.CRDs
	bins.apiserver = filepath.Join(kubetest.BinDir(), "kube-apiserver")
	if _, err := os.Stat(bins.apiserver); err != nil {
		bins.missing = fmt.Sprintf("kube-apiserver %s is not built at %s (test/cluster/tools/build.sh)", kubetest.Version, bins.apiserver)
	}
	etcd, err := exec.LookPath("etcd")
	if err != nil {
		bins.missing = "etcd is not on PATH (install Debian's etcd-server)"
	}
	bins.etcd = etcd
	return nil
}
