package nodeagent

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"time"

	"sigs.k8s.io/yaml"

	"github.com/meshproxy/meshproxy/cni"
	"github.com/meshproxy/meshproxy/internal/atomicfile"
	"github.com/meshproxy/meshproxy/internal/fileread"
	"github.com/meshproxy/meshproxy/redirect"
)

// Defaults: the kubelet's CNI directories.
const (
	DefaultBinDir  = "/opt/cni/bin"
	DefaultConfDir = "/etc/cni/net.d"
	// credentialsDir is below the configuration directory (runtimes do not
	// read subdirectories), where the plugin's kubeconfig, token and
	// cluster CA are kept.
	credentialsDir = "meshproxy"
	// maxBinary bounds the plugin binary copied into the bin directory.
	maxBinary = 512 << 20
)

// Config says what the agent installs and where.
type Config struct {
	BinDir, ConfDir string
	// Binary is the plugin executable to install (the running meshproxy).
	Binary string
	// Mode is the capture of pods that name none.
	Mode              redirect.Mode
	ExcludeNamespaces []string
	// CgroupRoot is the directory on the node's cgroup v2 mount below which
	// the kubelet's pod cgroups are (ebpf mode); empty leaves the plugin's
	// default, /sys/fs/cgroup.
	CgroupRoot string
	// APIServer is the API server the plugin reads pods from (https URL);
	// TokenFile and CAFile are the credentials it uses, copied to the node.
	APIServer         string
	TokenFile, CAFile string
	Log               *slog.Logger
}

func (c Config) log() *slog.Logger {
	if c.Log != nil {
		return c.Log
	}
	return slog.Default()
}

func (c Config) credDir() string { return filepath.Join(c.ConfDir, credentialsDir) }

// KubeconfigPath is where the plugin's kubeconfig is written.
func (c Config) KubeconfigPath() string { return filepath.Join(c.credDir(), "kubeconfig") }

// Entry is the plugin's entry in the network configuration list.
func (c Config) Entry() map[string]any {
	e := map[string]any{
		"type":         cni.PluginType,
		"kubeconfig":   c.KubeconfigPath(),
		"mode":         string(c.Mode),
		"capabilities": map[string]any{"cgroupPath": true},
	}
	if c.CgroupRoot != "" {
		e["cgroupRoot"] = c.CgroupRoot
	}
	if c.ExcludeNamespaces != nil {
		ns := make([]any, len(c.ExcludeNamespaces))
		for i, n := range c.ExcludeNamespaces {
			ns[i] = n
		}
		e["excludeNamespaces"] = ns
	}
	return e
}

// InClusterAPIServer is the API server's address as a pod sees it.
func InClusterAPIServer() (string, error) {
	host, port := os.Getenv("KUBERNETES_SERVICE_HOST"), os.Getenv("KUBERNETES_SERVICE_PORT")
	if host == "" || port == "" {
		return "", errors.New("KUBERNETES_SERVICE_HOST/PORT not set (not running in a pod? give --api-server)")
	}
	return "https://" + net.JoinHostPort(host, port), nil
}

// Install puts the plugin on the node: the binary, the credentials and
// kubeconfig, and the chained entry. Each step is skipped when already done.
func Install(cfg Config) error {
	if err := installBinary(cfg); err != nil {
		return err
	}
	if err := writeCredentials(cfg); err != nil {
		return err
	}
	path, err := ChainEntry(cfg.ConfDir, cfg.Entry())
	if err != nil {
		return err
	}
	if path != "" {
		cfg.log().Info("chained the meshproxy CNI plugin", "conf", path)
	}
	return nil
}

// Uninstall removes the entry from every network configuration list, then
// the credentials and the binary. Pods already running keep their capture.
func Uninstall(cfg Config) error {
	changed, err := UnchainEntry(cfg.ConfDir, cni.PluginType)
	for _, p := range changed {
		cfg.log().Info("removed the meshproxy CNI plugin from the chain", "conf", p)
	}
	if err != nil {
		return err
	}
	if err := os.RemoveAll(cfg.credDir()); err != nil {
		return fmt.Errorf("remove plugin credentials: %w", err)
	}
	if err := os.Remove(filepath.Join(cfg.BinDir, cni.PluginType)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove plugin binary: %w", err)
	}
	return nil
}

// Run installs the plugin, then re-applies it every interval (the primary
// CNI may rewrite its list; the token rotates) until ctx ends. A node whose
// primary CNI is not installed yet is waited for. Run leaves everything in
// place when it returns, so a restart or an upgrade does not disturb pods.
func Run(ctx context.Context, cfg Config, interval time.Duration) error {
	t := time.NewTicker(interval)
	defer t.Stop()
	installed := false
	for {
		err := refresh(cfg, installed)
		switch {
		case err == nil && !installed:
			installed = true
			cfg.log().Info("meshproxy CNI plugin installed", "bin_dir", cfg.BinDir, "conf_dir", cfg.ConfDir)
		case errors.Is(err, ErrNoPrimary):
			cfg.log().Warn("waiting for the primary CNI plugin's configuration", "conf_dir", cfg.ConfDir)
		case err != nil:
			cfg.log().Error("install the meshproxy CNI plugin", "err", err)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

// refresh is Install, except that once installed the binary is only
// copied again when it is missing (reading it every interval would cost).
func refresh(cfg Config, installed bool) error {
	if !installed {
		return Install(cfg)
	}
	if _, err := os.Stat(filepath.Join(cfg.BinDir, cni.PluginType)); err != nil {
		if err := installBinary(cfg); err != nil {
			return err
		}
	}
	if err := writeCredentials(cfg); err != nil {
		return err
	}
	path, err := ChainEntry(cfg.ConfDir, cfg.Entry())
	if path != "" {
		cfg.log().Info("chained the meshproxy CNI plugin again (the list was rewritten)", "conf", path)
	}
	return err
}

// installBinary copies the plugin executable into the bin directory unless
// an identical one is there. The rename keeps running plugin processes on
// the old file.
func installBinary(cfg Config) error {
	dst := filepath.Join(cfg.BinDir, cni.PluginType)
	want, err := fileDigest(cfg.Binary)
	if err != nil {
		return fmt.Errorf("read plugin binary: %w", err)
	}
	if have, err := fileDigest(dst); err == nil && have == want {
		return nil
	}
	src, err := os.Open(cfg.Binary)
	if err != nil {
		return fmt.Errorf("read plugin binary: %w", err)
	}
	defer src.Close()
	if err := atomicfile.WriteFrom(dst, io.LimitReader(src, maxBinary), 0o755); err != nil {
		return fmt.Errorf("install plugin binary: %w", err)
	}
	cfg.log().Info("installed the plugin binary", "path", dst)
	return nil
}

// fileDigest is the SHA-256 of a regular file of at most maxBinary bytes.
func fileDigest(path string) ([sha256.Size]byte, error) {
	var sum [sha256.Size]byte
	f, err := os.Open(path)
	if err != nil {
		return sum, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return sum, err
	}
	if !fi.Mode().IsRegular() || fi.Size() > maxBinary {
		return sum, fmt.Errorf("%s: not a regular file of at most %d bytes", path, maxBinary)
	}
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return sum, fmt.Errorf("%s: %w", path, err)
	}
	copy(sum[:], h.Sum(nil))
	return sum, nil
}

// writeCredentials copies the token and cluster CA next to a kubeconfig
// naming them, all mode 0600 in a 0700 directory.
func writeCredentials(cfg Config) error {
	dir := cfg.credDir()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("plugin credentials: %w", err)
	}
	token, err := fileread.Read(cfg.TokenFile, fileread.MaxToken)
	if err != nil {
		return fmt.Errorf("plugin credentials: token: %w", err)
	}
	ca, err := fileread.Read(cfg.CAFile, fileread.MaxPEM)
	if err != nil {
		return fmt.Errorf("plugin credentials: cluster CA: %w", err)
	}
	tokenPath, caPath := filepath.Join(dir, "token"), filepath.Join(dir, "ca.crt")
	kc, err := yaml.Marshal(map[string]any{
		"apiVersion":      "v1",
		"kind":            "Config",
		"current-context": "meshproxy-cni",
		"contexts":        []any{map[string]any{"name": "meshproxy-cni", "context": map[string]any{"cluster": "local", "user": "meshproxy-cni"}}},
		"clusters":        []any{map[string]any{"name": "local", "cluster": map[string]any{"server": cfg.APIServer, "certificate-authority": caPath}}},
		"users":           []any{map[string]any{"name": "meshproxy-cni", "user": map[string]any{"tokenFile": tokenPath}}},
	})
	if err != nil {
		return fmt.Errorf("plugin kubeconfig: %w", err)
	}
	for _, f := range []struct {
		path string
		data []byte
	}{{caPath, ca}, {tokenPath, token}, {cfg.KubeconfigPath(), kc}} {
		if sameContent(f.path, f.data, fileread.MaxPEM) {
			continue
		}
		if err := atomicfile.Write(f.path, f.data, 0o600); err != nil {
			return fmt.Errorf("plugin credentials: %w", err)
		}
	}
	return nil
}
