package main

import (
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/spf13/cobra"

	"github.com/meshproxy/meshproxy/redirect"
)

// redirectFlags are the flags shared by install, uninstall and status.
type redirectFlags struct {
	mode            string
	proxyUID        uint32
	proxyGID        uint32
	inboundPort     uint16
	outboundPort    uint16
	excludeInbound  string
	excludeOutbound string
	tproxy          bool
	cgroup          string
	cgroupRoot      string
	podUID          string
	iptablesBackend string
}

func (f *redirectFlags) register(cmd *cobra.Command) {
	fl := cmd.Flags()
	fl.StringVar(&f.mode, "mode", string(redirect.ModeNftables), "capture mechanism: nftables, iptables or ebpf")
	fl.Uint32Var(&f.proxyUID, "proxy-uid", redirect.DefaultProxyUID, "uid of the proxy; its own traffic is never captured")
	fl.Uint32Var(&f.proxyGID, "proxy-gid", redirect.DefaultProxyGID, "gid of the proxy; its own traffic is never captured")
	fl.Uint16Var(&f.inboundPort, "inbound-port", redirect.DefaultInboundPort, "port inbound TCP is redirected to")
	fl.Uint16Var(&f.outboundPort, "outbound-port", redirect.DefaultOutboundPort, "port outbound TCP is redirected to")
	fl.StringVar(&f.excludeInbound, "exclude-inbound-ports", "", "comma-separated inbound ports left alone (the proxy's own ports always are)")
	fl.StringVar(&f.excludeOutbound, "exclude-outbound-cidrs", "", "comma-separated destination CIDRs (IPv4 or IPv6) left alone")
	fl.BoolVar(&f.tproxy, "tproxy", false, "capture inbound with TPROXY (the app sees the real client address) instead of REDIRECT")
	fl.StringVar(&f.cgroup, "cgroup", "", "ebpf: the pod's cgroup v2 directory, e.g. /sys/fs/cgroup/kubepods.slice/..., or auto: find the cgroup of --pod-uid below --cgroup-root")
	fl.StringVar(&f.cgroupRoot, "cgroup-root", "/sys/fs/cgroup", "ebpf with --cgroup auto: the host's cgroup mount (cgroup v2 there or, on hybrid v1 hosts, in unified/)")
	fl.StringVar(&f.podUID, "pod-uid", "", "ebpf with --cgroup auto: the pod's UID (the downward API's metadata.uid)")
	fl.StringVar(&f.iptablesBackend, "iptables-backend", redirect.BackendAuto, "iptables: auto (the backend already in use, else nft), nft or legacy")
}

// config validates the flags into a redirect.Config; errors name the flag.
func (f *redirectFlags) config(cmd *cobra.Command) (redirect.Config, error) {
	mode := redirect.Mode(f.mode)
	if !slices.Contains(redirect.Modes, mode) {
		return redirect.Config{}, usagef("--mode %q: want nftables, iptables or ebpf", f.mode)
	}
	for _, fl := range []struct {
		name string
		v    uint32
	}{{"proxy-uid", f.proxyUID}, {"proxy-gid", f.proxyGID}} {
		if fl.v == 0 {
			return redirect.Config{}, usagef("--%s 0: exempting root's traffic from capture would let every root process bypass the proxy", fl.name)
		}
	}
	for _, fl := range []struct {
		name string
		v    uint16
	}{{"inbound-port", f.inboundPort}, {"outbound-port", f.outboundPort}} {
		if fl.v == 0 {
			return redirect.Config{}, usagef("--%s 0: want 1-65535", fl.name)
		}
	}
	if f.inboundPort == f.outboundPort {
		return redirect.Config{}, usagef("--inbound-port and --outbound-port are both %d", f.inboundPort)
	}
	ports, err := redirect.ParsePorts(f.excludeInbound)
	if err != nil {
		return redirect.Config{}, usagef("--exclude-inbound-ports: %v", err)
	}
	cidrs, err := redirect.ParseCIDRs(f.excludeOutbound)
	if err != nil {
		return redirect.Config{}, usagef("--exclude-outbound-cidrs: %v", err)
	}
	if mode == redirect.ModeEBPF && f.cgroup == "" {
		return redirect.Config{}, usagef("--mode ebpf needs --cgroup (the pod's cgroup v2 directory)")
	}
	if mode != redirect.ModeEBPF && f.cgroup != "" {
		return redirect.Config{}, usagef("--cgroup is only used with --mode ebpf")
	}
	if (f.cgroup == redirect.CgroupAuto) != (f.podUID != "") {
		return redirect.Config{}, usagef("--pod-uid goes with --cgroup auto, and --cgroup auto needs --pod-uid")
	}
	cgroup := f.cgroup
	if cgroup == redirect.CgroupAuto {
		found, err := redirect.FindPodCgroup(f.cgroupRoot, f.podUID)
		if err != nil {
			return redirect.Config{}, fmt.Errorf("--cgroup auto: %w", err)
		}
		cgroup = found
	}
	backend := ""
	if mode == redirect.ModeIptables {
		backend = f.iptablesBackend
		switch backend {
		case redirect.BackendAuto, redirect.BackendNft, redirect.BackendLegacy:
		default:
			return redirect.Config{}, usagef("--iptables-backend %q: want auto, nft or legacy", backend)
		}
	} else if cmd.Flags().Changed("iptables-backend") {
		return redirect.Config{}, usagef("--iptables-backend is only used with --mode iptables")
	}
	cfg := redirect.Config{
		Mode: mode, ProxyUID: f.proxyUID, ProxyGID: f.proxyGID,
		InboundPort: f.inboundPort, OutboundPort: f.outboundPort,
		ExcludeInboundPorts: ports, ExcludeOutboundCIDRs: cidrs,
		TProxy: f.tproxy, CgroupPath: cgroup, IptablesBackend: backend,
	}
	if err := cfg.Validate(); err != nil {
		if errors.Is(err, redirect.ErrInvalidConfig) {
			return redirect.Config{}, usagef("%v", err)
		}
		return redirect.Config{}, err
	}
	return cfg, nil
}

func newRedirectCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "redirect",
		Short: "Install, remove or show the pod's traffic capture (the init step)",
		Long: `redirect sets up the kernel so that the pod's TCP traffic reaches the sidecar,
in the pod's network namespace (run it there, as root or with CAP_NET_ADMIN;
ebpf also needs CAP_BPF):

  outbound  TCP the pod sends → the proxy's --outbound-port (15001), except the
            proxy's own traffic (--proxy-uid/--proxy-gid 1337), loopback and the
            pod's own addresses, and --exclude-outbound-cidrs
  inbound   TCP arriving at the pod → --inbound-port (15006), except the proxy's
            own ports (15000 15001 15006 15008 15020 15021 15090) and
            --exclude-inbound-ports

Mechanisms (--mode):
  nftables  (default) one table, "inet meshproxy", installed in one atomic batch
  iptables  chains MESHPROXY_* via iptables-restore/ip6tables-restore, on the nft
            or legacy backend (--iptables-backend, auto-detected by default)
  ebpf      cgroup/connect4+connect6 programs on --cgroup rewrite outbound
            connects; a cgroup/getsockopt program answers SO_ORIGINAL_DST; pinned
            under /sys/fs/bpf/meshproxy/; inbound uses the nftables rule

--tproxy captures inbound with TPROXY (mark 0x539, policy routing table 133)
instead of REDIRECT, so the app sees the real client address; the sidecar
then listens with IP_TRANSPARENT.

install is idempotent and rolls back on failure; uninstall removes exactly
what install added; status prints the live rules and which mechanism does
what. Give uninstall and status the same flags as install.`,
		Example: `  meshproxy redirect install
  meshproxy redirect install --mode iptables --exclude-inbound-ports 8443 --exclude-outbound-cidrs 169.254.169.254/32
  meshproxy redirect install --mode ebpf --cgroup /sys/fs/cgroup/kubepods.slice/pod1234
  meshproxy redirect status --tproxy
  meshproxy redirect uninstall`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return usagef("redirect: missing subcommand (install, uninstall or status)")
		},
	}
	cmd.AddCommand(newRedirectActionCmd("install"), newRedirectActionCmd("uninstall"), newRedirectActionCmd("status"))
	return cmd
}

func newRedirectActionCmd(action string) *cobra.Command {
	var f redirectFlags
	short := map[string]string{
		"install":   "Install traffic capture (idempotent; rolls back on failure)",
		"uninstall": "Remove exactly what install added",
		"status":    "Print the live capture rules and which mechanism does what",
	}[action]
	cmd := &cobra.Command{
		Use:   action,
		Short: short,
		Long: short + `.

Run it in the pod's network namespace. Give install, uninstall and status the
same flags. See 'meshproxy redirect --help' for what is captured and how.`,
		Example: "  meshproxy redirect " + action + "\n  meshproxy redirect " + action +
			" --mode ebpf --cgroup /sys/fs/cgroup/kubepods.slice/pod1234",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := f.config(cmd)
			if err != nil {
				return err
			}
			err = runRedirect(cmd, action, cfg)
			if errors.Is(err, redirect.ErrInvalidConfig) {
				return usageError{err} // e.g. --cgroup is not a cgroup v2 directory
			}
			return err
		},
	}
	f.register(cmd)
	return cmd
}

// runRedirect performs one redirect action with a validated config.
func runRedirect(cmd *cobra.Command, action string, cfg redirect.Config) error {
	ctx := cmd.Context()
	out := cmd.OutOrStdout()
	switch action {
	case "install":
		if err := redirect.Install(ctx, cfg); err != nil {
			return err
		}
		fmt.Fprintf(out, "redirect: %s capture installed\n", cfg.Mode)
	case "uninstall":
		if err := redirect.Uninstall(ctx, cfg); err != nil {
			return err
		}
		fmt.Fprintf(out, "redirect: %s capture removed\n", cfg.Mode)
	case "status":
		st, err := redirect.Status(ctx, cfg)
		if err != nil {
			return err
		}
		fmt.Fprint(out, strings.TrimRight(st.String(), "\n")+"\n")
	}
	return nil
}
