package main

import (
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/meshproxy/meshproxy/cni"
	"github.com/meshproxy/meshproxy/internal/podcapture"
	"github.com/meshproxy/meshproxy/nodeagent"
	"github.com/meshproxy/meshproxy/redirect"
)

// isCNIInvocation reports whether the binary was started by a container
// runtime as the CNI plugin (installed under the plugin's type name).
func isCNIInvocation(argv0 string) bool { return filepath.Base(argv0) == cni.PluginType }

func newCNICmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "cni",
		Short: "The chained CNI plugin that installs a pod's capture from the node",
		Long: `cni is meshproxy's chained CNI plugin (ADD, DEL, CHECK and VERSION as the CNI
spec says: the command in CNI_COMMAND, the network configuration on stdin, the
result on stdout). 'meshproxy node-agent' installs this binary on the node as
` + cni.PluginType + ` and chains it after the node's own CNI plugin.

On ADD for a pod annotated ` + podcapture.CaptureAnnotation + `: ` + podcapture.CaptureNode + ` (what
'meshproxy inject --capture node' writes) it installs exactly what 'meshproxy
redirect install' would, inside the pod's network namespace, before any of the
pod's containers starts; the pod's ` + podcapture.ModeAnnotation + `,
` + podcapture.ProxyUIDAnnotation + `, ` + podcapture.ExcludeInboundPortsAnnotation + ` and
` + podcapture.ExcludeOutboundCIDRsAnnotation + ` annotations refine it. A failure fails
the pod's sandbox, with the reason in the kubelet's events. Other pods pass
through untouched; the previous plugin's result is passed on unchanged.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return cni.Main("meshproxy " + version + " CNI plugin")
		},
	}
	cmd.AddCommand(newCNIValidateCmd())
	return cmd
}

func newCNIValidateCmd() *cobra.Command {
	var (
		outboundPort uint16
		sentinel     string
		attempts     int
		timeout      time.Duration
	)
	cmd := &cobra.Command{
		Use:   "validate",
		Short: "Check that the pod's outbound capture is in place (the validation init container)",
		Long: `validate proves, from inside the pod and without any capability, that the node
installed the pod's capture: it listens on the outbound port and connects to a
sentinel address that is never routed; only a redirect brings the connection
to the listener. It exits 1 when capture is missing, so the pod does not start
without it. Run it as a uid other than the proxy's (whose traffic is exempt),
before the sidecar starts.`,
		Example: "  meshproxy cni validate\n  meshproxy cni validate --sentinel 192.0.2.1:15002 --attempts 5",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ap, err := netip.ParseAddrPort(sentinel)
			if err != nil || ap.Addr().IsLoopback() || ap.Port() == 0 {
				return usagef("--sentinel %q: want a non-loopback IP:PORT", sentinel)
			}
			if outboundPort == 0 {
				return usagef("--outbound-port 0: want 1-65535")
			}
			if attempts < 1 || attempts > 100 {
				return usagef("--attempts %d: want 1-100", attempts)
			}
			if timeout <= 0 {
				return usagef("--timeout %v: want a positive duration", timeout)
			}
			if err := redirect.VerifyOutbound(cmd.Context(), outboundPort, ap, attempts, timeout); err != nil {
				return fmt.Errorf("capture validation failed (is meshproxy's node agent running on this node?): %w", err)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "capture validated: a connection to %s reached the outbound port %d\n", ap, outboundPort)
			return nil
		},
	}
	f := cmd.Flags()
	f.Uint16Var(&outboundPort, "outbound-port", redirect.DefaultOutboundPort, "the proxy's outbound port, where captured connections arrive")
	f.StringVar(&sentinel, "sentinel", podcapture.Sentinel.String(), "an address that is never routed (TEST-NET-1 by default)")
	f.IntVar(&attempts, "attempts", 5, "connection attempts before giving up")
	f.DurationVar(&timeout, "timeout", 2*time.Second, "time each attempt may take")
	return cmd
}

func newNodeAgentCmd() *cobra.Command {
	var (
		cfg       nodeagent.Config
		mode      string
		excludeNS []string
		interval  time.Duration
		saDir     string
		apiServer string
		binary    string
		uninstall bool
	)
	cmd := &cobra.Command{
		Use:   "node-agent",
		Short: "Install the meshproxy CNI plugin on this node and keep it installed",
		Long: `node-agent runs on every node (a privileged DaemonSet with the node's CNI
directories mounted): it copies this binary into --bin-dir as ` + cni.PluginType + `,
writes the plugin's kubeconfig (the agent's service account token, refreshed as
it rotates) below --conf-dir, and chains the plugin at the end of the node's
primary network configuration list (atomic writes; nothing is rewritten that is
already right). It re-applies the entry every --interval, since the primary CNI
may rewrite its list.

Stopping or upgrading the agent leaves the node as it is: running pods keep
their capture and new pods keep getting it. --uninstall removes the entry, the
kubeconfig and the binary, and exits; pods already running keep their capture
until they are deleted, and injected pods created afterwards fail their
validation instead of running without capture.`,
		Example: "  meshproxy node-agent\n  meshproxy node-agent --mode ebpf\n  meshproxy node-agent --uninstall",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg.Mode = redirect.Mode(mode)
			switch cfg.Mode {
			case redirect.ModeNftables, redirect.ModeIptables, redirect.ModeEBPF:
			default:
				return usagef("--mode %q: want nftables, iptables or ebpf", mode)
			}
			for _, d := range []struct{ flag, path string }{{"bin-dir", cfg.BinDir}, {"conf-dir", cfg.ConfDir}, {"cgroup-root", cfg.CgroupRoot}} {
				if !filepath.IsAbs(d.path) {
					return usagef("--%s %q: want an absolute path", d.flag, d.path)
				}
			}
			for _, ns := range excludeNS {
				if ns == "" || strings.ContainsAny(ns, " /") {
					return usagef("--exclude-namespaces: %q is not a namespace", ns)
				}
			}
			cfg.ExcludeNamespaces = excludeNS
			cfg.Log = slog.New(slog.NewTextHandler(cmd.ErrOrStderr(), nil))
			if uninstall {
				return nodeagent.Uninstall(cfg)
			}
			if interval < time.Second {
				return usagef("--interval %v: want at least 1s", interval)
			}
			if binary == "" {
				exe, err := os.Executable()
				if err != nil {
					return fmt.Errorf("find this binary to install: %w (give --binary)", err)
				}
				binary = exe
			}
			cfg.Binary = binary
			if apiServer == "" {
				s, err := nodeagent.InClusterAPIServer()
				if err != nil {
					return usagef("--api-server: %v", err)
				}
				apiServer = s
			}
			if !strings.HasPrefix(apiServer, "https://") {
				return usagef("--api-server %q: want an https:// URL", apiServer)
			}
			cfg.APIServer = apiServer
			cfg.TokenFile, cfg.CAFile = filepath.Join(saDir, "token"), filepath.Join(saDir, "ca.crt")
			return nodeagent.Run(cmd.Context(), cfg, interval)
		},
	}
	f := cmd.Flags()
	f.StringVar(&cfg.BinDir, "bin-dir", nodeagent.DefaultBinDir, "the node's CNI bin directory (mounted)")
	f.StringVar(&cfg.ConfDir, "conf-dir", nodeagent.DefaultConfDir, "the node's CNI configuration directory (mounted)")
	f.StringVar(&mode, "mode", string(redirect.ModeNftables), "capture of pods that name none: nftables, iptables or ebpf")
	f.StringVar(&cfg.CgroupRoot, "cgroup-root", cni.DefaultCgroupRoot, "ebpf: the directory on the node's cgroup v2 mount that holds the kubelet's kubepods cgroups (e.g. /sys/fs/cgroup/unified on a hybrid cgroup v1 node, plus the kubelet's --cgroup-root)")
	f.StringSliceVar(&excludeNS, "exclude-namespaces", cni.DefaultExcludeNamespaces, "namespaces the plugin never captures")
	f.DurationVar(&interval, "interval", 30*time.Second, "how often the installation is checked and re-applied")
	f.StringVar(&saDir, "service-account-dir", "/var/run/secrets/kubernetes.io/serviceaccount", "directory with the agent's token and the cluster CA (ca.crt)")
	f.StringVar(&apiServer, "api-server", "", "API server the plugin reads pods from (default: the in-cluster address)")
	f.StringVar(&binary, "binary", "", "plugin binary to install (default: this binary)")
	f.BoolVar(&uninstall, "uninstall", false, "remove the plugin from the node and exit")
	return cmd
}
