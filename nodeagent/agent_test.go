package nodeagent

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"

	"github.com/meshproxy/meshproxy/ca/authn"
	"github.com/meshproxy/meshproxy/cni"
	"github.com/meshproxy/meshproxy/internal/testpki"
	"github.com/meshproxy/meshproxy/redirect"
)

const kindnet = `{
  "cniVersion": "0.4.0",
  "name": "kindnet",
  "plugins": [
    {"type": "ptp", "ipMasq": false, "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.0.0/24"}]]}, "mtu": 1500},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
`

func write(t *testing.T, path, data string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(data), 0o644); err != nil {
		t.Fatal(err)
	}
}

func decoded(t *testing.T, path string) map[string]any {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	return m
}

func testConfig(t *testing.T) Config {
	t.Helper()
	dir := t.TempDir()
	c := Config{
		BinDir: filepath.Join(dir, "bin"), ConfDir: filepath.Join(dir, "net.d"),
		Binary: filepath.Join(dir, "meshproxy"), Mode: redirect.ModeEBPF,
		ExcludeNamespaces: []string{"kube-system", "meshproxy-system"},
		CgroupRoot:        "/sys/fs/cgroup/unified/kubelet-root",
		APIServer:         "https://10.96.0.1:443",
		TokenFile:         filepath.Join(dir, "token"), CAFile: filepath.Join(dir, "ca.crt"),
	}
	for _, d := range []string{c.BinDir, c.ConfDir} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	write(t, c.Binary, "#!/bin/sh\necho plugin\n")
	write(t, c.TokenFile, "token-1")
	write(t, c.CAFile, string(testpki.PEMCerts(testpki.New(t, "cluster.local").Root)))
	return c
}

// TestInstallChainsAndUninstallRestores: the entry goes last in the
// primary list (which a runtime's libcni loads), the binary and a usable
// kubeconfig are in place; installing again rewrites nothing; uninstall
// gives back the list as it was and removes the rest.
func TestInstallChainsAndUninstallRestores(t *testing.T) {
	c := testConfig(t)
	primary := filepath.Join(c.ConfDir, "10-kindnet.conflist")
	write(t, primary, kindnet)
	write(t, filepath.Join(c.ConfDir, "99-other.conflist"), kindnet) // not the one the runtime uses
	before := decoded(t, primary)

	if err := Install(c); err != nil {
		t.Fatalf("install: %v", err)
	}
	list, err := libcni.ConfListFromFile(primary)
	if err != nil {
		t.Fatalf("runtime cannot load the list: %v", err)
	}
	if n := len(list.Plugins); n != 3 || list.Plugins[0].Network.Type != "ptp" || list.Plugins[2].Network.Type != cni.PluginType {
		t.Fatalf("plugins: %d, want ptp, portmap, %s", n, cni.PluginType)
	}
	conf, err := cni.ParseConf(list.Plugins[2].Bytes)
	if err != nil {
		t.Fatalf("plugin cannot parse its entry: %v", err)
	}
	if conf.Mode != redirect.ModeEBPF || conf.Kubeconfig != c.KubeconfigPath() || !reflect.DeepEqual(conf.ExcludeNamespaces, c.ExcludeNamespaces) ||
		conf.CgroupRoot != c.CgroupRoot {
		t.Fatalf("entry: %+v", conf)
	}
	if got := decoded(t, filepath.Join(c.ConfDir, "99-other.conflist")); !reflect.DeepEqual(got, before) {
		t.Fatalf("a list the runtime does not use was changed")
	}
	fi, err := os.Stat(filepath.Join(c.BinDir, cni.PluginType))
	if err != nil || fi.Mode().Perm() != 0o755 {
		t.Fatalf("plugin binary: %v %v", fi, err)
	}
	api, err := authn.KubeconfigAPI(c.KubeconfigPath())
	if err != nil || api.Server() != c.APIServer {
		t.Fatalf("plugin kubeconfig: %v", err)
	}
	for _, f := range []string{"token", "ca.crt", "kubeconfig"} {
		if fi, err := os.Stat(filepath.Join(c.credDir(), f)); err != nil || fi.Mode().Perm() != 0o600 {
			t.Fatalf("credential %s: %v %v", f, fi, err)
		}
	}

	stamp := time.Unix(1_000_000_000, 0)
	for _, p := range []string{primary, filepath.Join(c.BinDir, cni.PluginType), c.KubeconfigPath()} {
		if err := os.Chtimes(p, stamp, stamp); err != nil {
			t.Fatal(err)
		}
	}
	if err := Install(c); err != nil {
		t.Fatalf("second install: %v", err)
	}
	for _, p := range []string{primary, filepath.Join(c.BinDir, cni.PluginType), c.KubeconfigPath()} {
		if fi, _ := os.Stat(p); !fi.ModTime().Equal(stamp) {
			t.Errorf("%s rewritten by an install that had nothing to do", p)
		}
	}
	if entries, _ := os.ReadDir(c.ConfDir); len(entries) != 3 {
		t.Errorf("configuration directory holds %d entries, want the two lists and meshproxy/ (temporary files left?)", len(entries))
	}

	if err := Uninstall(c); err != nil {
		t.Fatalf("uninstall: %v", err)
	}
	if got := decoded(t, primary); !reflect.DeepEqual(got, before) {
		t.Fatalf("uninstall did not restore the list:\n got %v\nwant %v", got, before)
	}
	for _, p := range []string{filepath.Join(c.BinDir, cni.PluginType), c.credDir()} {
		if _, err := os.Stat(p); !os.IsNotExist(err) {
			t.Errorf("%s left after uninstall: %v", p, err)
		}
	}
	if err := Uninstall(c); err != nil {
		t.Fatalf("second uninstall: %v", err)
	}
}

// TestSinglePluginConfBecomesList: a primary .conf is turned into a
// .conflist of the same name (chaining needs a list), which a runtime
// loads with the original plugin first.
func TestSinglePluginConfBecomesList(t *testing.T) {
	c := testConfig(t)
	write(t, filepath.Join(c.ConfDir, "10-bridge.conf"),
		`{"cniVersion":"1.0.0","name":"br","type":"bridge","bridge":"cni0","ipam":{"type":"host-local","subnet":"10.1.0.0/16"}}`)
	if err := Install(c); err != nil {
		t.Fatalf("install: %v", err)
	}
	if _, err := os.Stat(filepath.Join(c.ConfDir, "10-bridge.conf")); !os.IsNotExist(err) {
		t.Fatalf("the .conf is still there (a runtime would pick it): %v", err)
	}
	list, err := libcni.ConfListFromFile(filepath.Join(c.ConfDir, "10-bridge.conflist"))
	if err != nil {
		t.Fatal(err)
	}
	if list.Name != "br" || list.CNIVersion != "1.0.0" || len(list.Plugins) != 2 ||
		list.Plugins[0].Network.Type != "bridge" || list.Plugins[1].Network.Type != cni.PluginType {
		t.Fatalf("list: %+v", list)
	}
}

// TestNoPrimaryIsWaitedFor: without the primary CNI's configuration there
// is nothing to chain after; the error says so and nothing is written.
func TestNoPrimaryIsWaitedFor(t *testing.T) {
	c := testConfig(t)
	if err := Install(c); !errors.Is(err, ErrNoPrimary) {
		t.Fatalf("install without a primary: %v", err)
	}
	write(t, filepath.Join(c.ConfDir, "10-empty.conflist"), `{"cniVersion":"1.0.0","name":"x","plugins":[]}`)
	if _, err := ChainEntry(c.ConfDir, c.Entry()); err == nil {
		t.Fatal("chained as the first and only plugin")
	}
}

// TestRefreshRechainsARewrittenList: the primary CNI rewriting its list
// drops the entry; the next refresh puts it back, and a rotated token is
// copied.
func TestRefreshRechainsARewrittenList(t *testing.T) {
	c := testConfig(t)
	primary := filepath.Join(c.ConfDir, "10-kindnet.conflist")
	write(t, primary, kindnet)
	if err := Install(c); err != nil {
		t.Fatal(err)
	}
	write(t, primary, kindnet)
	write(t, c.TokenFile, "token-2")
	if err := refresh(c, true); err != nil {
		t.Fatal(err)
	}
	list, err := libcni.ConfListFromFile(primary)
	if err != nil || len(list.Plugins) != 3 || list.Plugins[2].Network.Type != cni.PluginType {
		t.Fatalf("not chained again: %v", err)
	}
	if b, _ := os.ReadFile(filepath.Join(c.credDir(), "token")); string(b) != "token-2" {
		t.Fatalf("token not refreshed: %q", b)
	}
}
