package redirect

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os/exec"
	"slices"
	"strings"
)

// Our iptables chains (modelled on istio-iptables' ISTIO_* chains).
const (
	iptInbound    = "MESHPROXY_INBOUND"     // nat/mangle PREROUTING → here
	iptInRedirect = "MESHPROXY_IN_REDIRECT" // nat: REDIRECT to the inbound port
	iptOutput     = "MESHPROXY_OUTPUT"      // nat OUTPUT → here
	iptRedirect   = "MESHPROXY_REDIRECT"    // nat: REDIRECT to the outbound port
	iptDivert     = "MESHPROXY_DIVERT"      // mangle: mark packets of transparent sockets
	iptTProxy     = "MESHPROXY_TPROXY"      // mangle: TPROXY to the inbound port
	iptUpstream   = "MESHPROXY_UPSTREAM"    // mangle OUTPUT → here: connmark of the proxy's transparent upstream
)

const iptPrefix = "MESHPROXY_"

// iptFamily is one of iptables (4) and ip6tables (6) with its tools.
type iptFamily struct {
	family  int
	backend string // nft, legacy, or "" when only the plain tool exists
	restore string
	save    string
}

// String names the tool and backend, e.g. "ip6tables (nft)".
func (f iptFamily) String() string {
	name := "iptables"
	if f.family == 6 {
		name = "ip6tables"
	}
	if f.backend != "" {
		return name + " (" + f.backend + ")"
	}
	return name
}

// iptTable is the part of one iptables table we care about: our chains with
// their rules, and the rules of built-in chains that jump to them.
type iptTable struct {
	name   string
	chains []string            // ours, in declaration order
	rules  map[string][]string // chain → rule specs (without "-A CHAIN ")
}

func newIptTable(name string) *iptTable {
	return &iptTable{name: name, rules: map[string][]string{}}
}

func (t *iptTable) add(chain string, specs ...string) {
	if strings.HasPrefix(chain, iptPrefix) && !slices.Contains(t.chains, chain) {
		t.chains = append(t.chains, chain)
	}
	t.rules[chain] = append(t.rules[chain], specs...)
}

func (t *iptTable) empty() bool { return len(t.chains) == 0 && len(t.rules) == 0 }

// desiredIptables returns the tables cfg needs for one family.
func desiredIptables(cfg Config, family int) []*iptTable {
	loop := "127.0.0.0/8"
	anyAddr := "0.0.0.0"
	if family == 6 {
		loop, anyAddr = "::1/128", "::"
	}
	nat := newIptTable("nat")
	var tables []*iptTable
	if cfg.TProxy {
		mangle := newIptTable("mangle")
		mangle.add(iptInbound)
		mangle.add(iptDivert)
		mangle.add(iptTProxy)
		mangle.add("PREROUTING", "-p tcp -j "+iptInbound)
		mangle.add(iptInbound, "-i lo -j RETURN")
		for _, p := range cfg.inboundExcluded() {
			mangle.add(iptInbound, fmt.Sprintf("-p tcp -m tcp --dport %d -j RETURN", p))
		}
		// Packets of TPROXY'd connections go to their transparent socket;
		// other established traffic (replies to the pod's own connections)
		// is left alone, because TPROXY drops packets of a non-transparent
		// socket.
		mangle.add(iptInbound,
			"-p tcp -m socket --transparent -j "+iptDivert,
			"-p tcp -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN",
			"-p tcp -j "+iptTProxy)
		mangle.add(iptDivert,
			fmt.Sprintf("-j MARK --set-xmark %#x/0xffffffff", cfg.TProxyMark),
			"-j ACCEPT")
		mangle.add(iptTProxy, fmt.Sprintf("! -d %s -p tcp -j TPROXY --on-port %d --on-ip %s --tproxy-mark %#x/0xffffffff",
			loop, cfg.InboundPort, anyAddr, cfg.TProxyMark))
		// The proxy reaches the app from the client's address on a socket
		// marked TProxyMark; the connection keeps the mark, and the app's
		// replies get it back, so mangle OUTPUT routes them again, by the
		// fwmark rule, to the proxy instead of out to the real client.
		mangle.add(iptUpstream)
		mangle.add("OUTPUT", "-p tcp -j "+iptUpstream)
		mangle.add(iptUpstream,
			fmt.Sprintf("-m mark --mark %#x -j CONNMARK --save-mark", cfg.TProxyMark),
			fmt.Sprintf("-m connmark --mark %#x -j CONNMARK --restore-mark", cfg.TProxyMark))
		tables = append(tables, mangle)
	} else {
		nat.add(iptInbound)
		nat.add(iptInRedirect)
		nat.add("PREROUTING", "-p tcp -j "+iptInbound)
		nat.add(iptInbound, "-i lo -j RETURN")
		for _, p := range cfg.inboundExcluded() {
			nat.add(iptInbound, fmt.Sprintf("-p tcp -m tcp --dport %d -j RETURN", p))
		}
		nat.add(iptInbound, "-p tcp -j "+iptInRedirect)
		nat.add(iptInRedirect, fmt.Sprintf("-p tcp -j REDIRECT --to-ports %d", cfg.InboundPort))
	}
	nat.add(iptOutput)
	nat.add(iptRedirect)
	nat.add("OUTPUT", "-p tcp -j "+iptOutput)
	nat.add(iptOutput,
		fmt.Sprintf("-m owner --uid-owner %d -j RETURN", cfg.ProxyUID),
		fmt.Sprintf("-m owner --gid-owner %d -j RETURN", cfg.ProxyGID),
		"-o lo -j RETURN",
		"-d "+loop+" -j RETURN")
	if cfg.TProxy {
		// The proxy's transparent connections to the app, whoever owns them.
		nat.add(iptOutput, fmt.Sprintf("-m mark --mark %#x -j RETURN", cfg.TProxyMark))
	}
	for _, p := range cfg.excludedCIDRs(family) {
		nat.add(iptOutput, "-d "+p.String()+" -j RETURN")
	}
	nat.add(iptOutput, "-j "+iptRedirect)
	nat.add(iptRedirect, fmt.Sprintf("-p tcp -j REDIRECT --to-ports %d", cfg.OutboundPort))
	return append([]*iptTable{nat}, tables...)
}

// iptDefaultMasks is how iptables before 1.8.10 prints CONNMARK's default
// masks, which later versions leave out; specs are compared without it.
const iptDefaultMasks = " --nfmask 0xffffffff --ctmask 0xffffffff"

// parseIptablesSave extracts our chains and the jumps to them from
// iptables-save output, table by table.
func parseIptablesSave(out string) map[string]*iptTable {
	tables := map[string]*iptTable{}
	var cur *iptTable
	for _, line := range strings.Split(out, "\n") {
		line = strings.TrimSpace(line)
		switch {
		case strings.HasPrefix(line, "*"):
			cur = newIptTable(line[1:])
			tables[cur.name] = cur
		case cur == nil:
		case strings.HasPrefix(line, ":"+iptPrefix):
			cur.add(strings.Fields(line[1:])[0])
		case strings.HasPrefix(line, "-A "):
			f := strings.SplitN(line[3:], " ", 2)
			if len(f) != 2 {
				continue
			}
			chain, spec := f[0], strings.ReplaceAll(f[1], iptDefaultMasks, "")
			if strings.HasPrefix(chain, iptPrefix) || strings.Contains(" "+spec+" ", " -j "+iptPrefix) || strings.Contains(" "+spec+" ", " -g "+iptPrefix) {
				cur.add(chain, spec)
			}
		}
	}
	for name, t := range tables {
		if t.empty() {
			delete(tables, name)
		}
	}
	return tables
}

// sameIptables compares our part of each table, chain by chain.
func sameIptables(live map[string]*iptTable, want []*iptTable) bool {
	if len(live) != len(want) {
		return false
	}
	for _, w := range want {
		l := live[w.name]
		if l == nil || len(l.rules) != len(w.rules) {
			return false
		}
		a, b := slices.Clone(l.chains), slices.Clone(w.chains)
		slices.Sort(a)
		slices.Sort(b)
		if !slices.Equal(a, b) {
			return false
		}
		for chain, rules := range w.rules {
			if !slices.Equal(l.rules[chain], rules) {
				return false
			}
		}
	}
	return true
}

// replaceScript turns live into want in one iptables-restore --noflush
// input; each table's COMMIT applies atomically.
func replaceScript(live map[string]*iptTable, want []*iptTable) string {
	var b strings.Builder
	names := map[string]bool{}
	for _, w := range want {
		names[w.name] = true
	}
	for n := range live {
		names[n] = true
	}
	order := slices.Sorted(func(yield func(string) bool) {
		for n := range names {
			if !yield(n) {
				return
			}
		}
	})
	for _, name := range order {
		l := live[name]
		var w *iptTable
		for _, t := range want {
			if t.name == name {
				w = t
			}
		}
		fmt.Fprintf(&b, "*%s\n", name)
		if l != nil {
			// Drop the jumps into our chains, then chains we no longer want.
			for chain, specs := range l.rules {
				if !strings.HasPrefix(chain, iptPrefix) {
					for _, s := range specs {
						fmt.Fprintf(&b, "-D %s %s\n", chain, s)
					}
				}
			}
			for _, c := range l.chains {
				if w == nil || !slices.Contains(w.chains, c) {
					fmt.Fprintf(&b, "-F %s\n", c)
				}
			}
			for _, c := range l.chains {
				if w == nil || !slices.Contains(w.chains, c) {
					fmt.Fprintf(&b, "-X %s\n", c)
				}
			}
		}
		if w != nil {
			for _, c := range w.chains {
				fmt.Fprintf(&b, ":%s - [0:0]\n", c) // with --noflush: create or flush
			}
			for _, c := range w.chains {
				for _, s := range w.rules[c] {
					fmt.Fprintf(&b, "-A %s %s\n", c, s)
				}
			}
			for chain, specs := range w.rules {
				if !strings.HasPrefix(chain, iptPrefix) {
					for _, s := range specs {
						fmt.Fprintf(&b, "-A %s %s\n", chain, s)
					}
				}
			}
		}
		b.WriteString("COMMIT\n")
	}
	return b.String()
}

// iptablesFamilies picks the tools for cfg.IptablesBackend (auto: the
// backend that already holds rules, as istio-iptables decides; nft when
// neither does).
func iptablesFamilies(ctx context.Context, cfg Config) ([]iptFamily, error) {
	backend := cfg.IptablesBackend
	if backend == BackendAuto || backend == "" {
		backend = detectBackend(ctx)
	}
	var fams []iptFamily
	for _, fam := range ipFamilies() {
		base := "iptables"
		if fam == 6 {
			base = "ip6tables"
		}
		f := iptFamily{family: fam, backend: backend,
			restore: base + "-" + backend + "-restore", save: base + "-" + backend + "-save"}
		if _, err := exec.LookPath(f.restore); err != nil {
			if cfg.IptablesBackend == BackendNft || cfg.IptablesBackend == BackendLegacy {
				return nil, fmt.Errorf("%w: iptables backend %s: %s not found (install the iptables package)", ErrUnsupported, backend, f.restore)
			}
			f = iptFamily{family: fam, restore: base + "-restore", save: base + "-save"}
			if _, err := exec.LookPath(f.restore); err != nil {
				return nil, fmt.Errorf("%w: %s not found (install the iptables package)", ErrUnsupported, f.restore)
			}
		}
		fams = append(fams, f)
	}
	return fams, nil
}

// detectBackend counts the rules each backend holds and picks the busier
// one, so our rules sit next to kube-proxy's or the CNI's.
func detectBackend(ctx context.Context) string {
	count := func(backend string) int {
		n := 0
		for _, tool := range []string{"iptables-" + backend + "-save", "ip6tables-" + backend + "-save"} {
			out, err := exec.CommandContext(ctx, tool).Output()
			if err != nil {
				continue
			}
			for _, l := range strings.Split(string(out), "\n") {
				if strings.HasPrefix(l, "-A ") {
					n++
				}
			}
		}
		return n
	}
	if _, err := exec.LookPath("iptables-legacy-save"); err == nil {
		if legacy := count(BackendLegacy); legacy > 0 && legacy > count(BackendNft) {
			return BackendLegacy
		}
	}
	return BackendNft
}

func (f iptFamily) read(ctx context.Context) (map[string]*iptTable, error) {
	// No -t: asking for a table would create it on the nft backend.
	cmd := exec.CommandContext(ctx, f.save)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, iptError(fmt.Errorf("%s: %w: %s", f.save, err, strings.TrimSpace(stderr.String())), stderr.String())
	}
	return parseIptablesSave(string(out)), nil
}

func (f iptFamily) apply(ctx context.Context, script string) error {
	cmd := exec.CommandContext(ctx, f.restore, "--noflush", "-w", "10")
	cmd.Stdin = strings.NewReader(script)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		msg := strings.TrimSpace(out.String())
		return iptError(fmt.Errorf("%s --noflush: %w: %s", f.restore, err, msg), msg)
	}
	return nil
}

// iptError recognises missing privileges and kernel support in the tools'
// messages.
func iptError(err error, msg string) error {
	low := strings.ToLower(msg)
	switch {
	case strings.Contains(low, "permission denied") || strings.Contains(low, "operation not permitted"):
		return fmt.Errorf("%w: CAP_NET_ADMIN is required (run as root or grant it): %w", ErrPermission, err)
	case strings.Contains(low, "no chain/target/match") || strings.Contains(low, "table does not exist") ||
		strings.Contains(low, "couldn't load") || strings.Contains(low, "protocol not supported") ||
		strings.Contains(low, "not supported"):
		return fmt.Errorf("%w: %w", ErrUnsupported, err)
	}
	return err
}

func installIptables(ctx context.Context, cfg Config) error {
	fams, err := iptablesFamilies(ctx, cfg)
	if err != nil {
		return err
	}
	var done []iptFamily
	rollback := func() {
		for _, f := range done {
			if live, err := f.read(ctx); err == nil && len(live) > 0 {
				if err := f.apply(ctx, replaceScript(live, nil)); err != nil {
					slog.Error("iptables rollback failed", "tool", f.String(), "err", err)
				}
			}
		}
	}
	for _, f := range fams {
		live, err := f.read(ctx)
		if err != nil {
			rollback()
			return err
		}
		want := desiredIptables(cfg, f.family)
		if sameIptables(live, want) {
			continue
		}
		if err := f.apply(ctx, replaceScript(live, want)); err != nil {
			done = append(done, f) // a table may have committed before the failure
			rollback()
			return err
		}
		done = append(done, f)
	}
	if cfg.TProxy {
		if err := installTProxyRoutes(cfg); err != nil {
			rollback()
			return err
		}
	} else if err := uninstallTProxyRoutes(cfg); err != nil {
		return err
	}
	return nil
}

func uninstallIptables(ctx context.Context, cfg Config) error {
	fams, err := iptablesFamilies(ctx, cfg)
	if err != nil {
		return err
	}
	var errs []error
	for _, f := range fams {
		live, err := f.read(ctx)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if len(live) == 0 {
			continue
		}
		if err := f.apply(ctx, replaceScript(live, nil)); err != nil {
			errs = append(errs, err)
		}
	}
	errs = append(errs, uninstallTProxyRoutes(cfg))
	return errors.Join(errs...)
}

func statusIptables(ctx context.Context, cfg Config, st *State) error {
	fams, err := iptablesFamilies(ctx, cfg)
	if err != nil {
		return err
	}
	present := map[string]bool{}
	for _, f := range fams {
		live, err := f.read(ctx)
		if err != nil {
			return err
		}
		for _, name := range []string{"nat", "mangle"} {
			t := live[name]
			if t == nil {
				continue
			}
			sec := Section{Title: fmt.Sprintf("%s table %s", f, name)}
			chains := slices.Sorted(func(yield func(string) bool) {
				for c := range t.rules {
					if !yield(c) {
						return
					}
				}
			})
			for _, c := range chains {
				for _, s := range t.rules[c] {
					sec.Lines = append(sec.Lines, fmt.Sprintf("-A %s %s", c, s))
				}
			}
			for _, c := range t.chains {
				present[fmt.Sprintf("%d/%s/%s", f.family, name, c)] = true
			}
			st.Sections = append(st.Sections, sec)
		}
	}
	both := func(table, chain string) bool { return present["4/"+table+"/"+chain] && present["6/"+table+"/"+chain] }
	backend := "auto"
	if len(fams) > 0 && fams[0].backend != "" {
		backend = fams[0].backend
	}
	st.Mechanisms = append(st.Mechanisms, Mechanism{Direction: "outbound",
		How:       fmt.Sprintf("iptables/ip6tables (%s) nat OUTPUT → %s → %s: REDIRECT to :%d", backend, iptOutput, iptRedirect, cfg.OutboundPort),
		Installed: both("nat", iptOutput) && both("nat", iptRedirect)})
	if cfg.TProxy {
		st.Mechanisms = append(st.Mechanisms, Mechanism{Direction: "inbound",
			How:       fmt.Sprintf("iptables/ip6tables (%s) mangle PREROUTING → %s → %s: TPROXY to :%d, mark %#x", backend, iptInbound, iptTProxy, cfg.InboundPort, cfg.TProxyMark),
			Installed: both("mangle", iptInbound) && both("mangle", iptTProxy) && both("mangle", iptDivert)})
		st.Mechanisms = append(st.Mechanisms, Mechanism{Direction: "inbound",
			How:       fmt.Sprintf("iptables/ip6tables (%s) mangle OUTPUT → %s: proxy→app connections marked %#x keep it in the connmark; the app's replies get it back and return to the proxy", backend, iptUpstream, cfg.TProxyMark),
			Installed: both("mangle", iptUpstream)})
		routes, ok, err := tproxyRoutesStatus(cfg)
		if err != nil {
			return err
		}
		st.Mechanisms = append(st.Mechanisms, Mechanism{Direction: "inbound",
			How:       fmt.Sprintf("policy routing: fwmark %#x → table %d (local default route via lo)", cfg.TProxyMark, cfg.RouteTable),
			Installed: ok})
		st.Sections = append(st.Sections, routes...)
	} else {
		st.Mechanisms = append(st.Mechanisms, Mechanism{Direction: "inbound",
			How:       fmt.Sprintf("iptables/ip6tables (%s) nat PREROUTING → %s → %s: REDIRECT to :%d", backend, iptInbound, iptInRedirect, cfg.InboundPort),
			Installed: both("nat", iptInbound) && both("nat", iptInRedirect)})
	}
	return nil
}
