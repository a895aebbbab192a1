package redirect

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/userdata"
	"golang.org/x/sys/unix"
)

// TableName is the nftables table (family inet) that holds all our rules.
const TableName = "meshproxy"

// Chains of our table.
const (
	chainInbound  = "inbound"        // nat prerouting: inbound REDIRECT
	chainOutbound = "outbound"       // nat output: outbound REDIRECT
	chainTProxy   = "inbound_tproxy" // filter prerouting at mangle priority: inbound TPROXY ("tproxy" is an nft keyword)
	chainUpstream = "upstream_mark"  // route output at mangle priority: the proxy's transparent upstream connections
)

// nftChain is one chain of the table with its rules.
type nftChain struct {
	chain *nftables.Chain
	rules []nftRule
}

// nftRule is a rule's expressions and its comment. Every rule we add
// carries its own rendering as comment: google/nftables does not parse
// every expression back (socket, tproxy), so the comment is what install
// compares and what status and `nft list` show.
type nftRule struct {
	exprs   []expr.Any
	comment string
}

// desiredNftables returns the chains cfg needs in table inet meshproxy.
func desiredNftables(cfg Config) (*nftables.Table, []nftChain) {
	table := &nftables.Table{Name: TableName, Family: nftables.TableFamilyINet}
	accept := nftables.ChainPolicyAccept
	var chains []nftChain
	if cfg.TProxy {
		chains = append(chains, nftChain{
			chain: &nftables.Chain{Name: chainTProxy, Table: table, Type: nftables.ChainTypeFilter,
				Hooknum: nftables.ChainHookPrerouting, Priority: nftables.ChainPriorityMangle, Policy: &accept},
			rules: withComments(tproxyRules(cfg)),
		})
		// A route chain: a mark set here makes the kernel route the packet
		// again, which is what sends the app's replies back to the proxy.
		chains = append(chains, nftChain{
			chain: &nftables.Chain{Name: chainUpstream, Table: table, Type: nftables.ChainTypeRoute,
				Hooknum: nftables.ChainHookOutput, Priority: nftables.ChainPriorityMangle, Policy: &accept},
			rules: withComments(upstreamRules(cfg)),
		})
	} else {
		chains = append(chains, nftChain{
			chain: &nftables.Chain{Name: chainInbound, Table: table, Type: nftables.ChainTypeNAT,
				Hooknum: nftables.ChainHookPrerouting, Priority: nftables.ChainPriorityNATDest, Policy: &accept},
			rules: withComments(inboundRules(cfg)),
		})
	}
	if cfg.Mode != ModeEBPF {
		chains = append(chains, nftChain{
			chain: &nftables.Chain{Name: chainOutbound, Table: table, Type: nftables.ChainTypeNAT,
				Hooknum: nftables.ChainHookOutput, Priority: nftables.ChainPriorityNATDest, Policy: &accept},
			rules: withComments(outboundRules(cfg)),
		})
	}
	return table, chains
}

func withComments(rules [][]expr.Any) []nftRule {
	out := make([]nftRule, 0, len(rules))
	for _, r := range rules {
		// No double quotes inside: `nft list ruleset` output must stay loadable by nft -f.
		out = append(out, nftRule{exprs: r, comment: strings.ReplaceAll(renderRule(r, false), `"`, "")})
	}
	return out
}

// inboundRules: TCP arriving from outside, not for the proxy's own or
// excluded ports, is redirected to the inbound port.
func inboundRules(cfg Config) [][]expr.Any {
	rules := [][]expr.Any{
		rule(notTCP(), ret()),
		rule(ifname(expr.MetaKeyIIFNAME, "lo"), ret()),
	}
	for _, p := range cfg.inboundExcluded() {
		rules = append(rules, rule(dport(p), ret()))
	}
	return append(rules, rule(isTCP(), redirectTo(cfg.InboundPort)))
}

// outboundRules: TCP sent by the pod, except the proxy's own, loopback and
// locally destined traffic and excluded CIDRs, is redirected to the
// outbound port.
func outboundRules(cfg Config) [][]expr.Any {
	rules := [][]expr.Any{
		rule(notTCP(), ret()),
		rule(metaU32(expr.MetaKeySKUID, cfg.ProxyUID), ret()),
		rule(metaU32(expr.MetaKeySKGID, cfg.ProxyGID), ret()),
		// Routed via lo: loopback and the pod's own addresses.
		rule(ifname(expr.MetaKeyOIFNAME, "lo"), ret()),
		rule(daddr(netip.MustParsePrefix("127.0.0.0/8")), ret()),
		rule(daddr(netip.MustParsePrefix("::1/128")), ret()),
	}
	if cfg.TProxy {
		// The proxy's transparent connections to the app, whoever owns them.
		rules = append(rules, rule(metaU32(expr.MetaKeyMARK, cfg.TProxyMark), ret()))
	}
	for _, p := range cfg.ExcludeOutboundCIDRs {
		rules = append(rules, rule(daddr(p), ret()))
	}
	return append(rules, rule(isTCP(), redirectTo(cfg.OutboundPort)))
}

// tproxyRules: packets of connections already owned by a transparent
// socket are marked (so policy routing delivers them locally); other
// established traffic (replies to the pod's own connections) is left alone;
// new inbound TCP is handed to the inbound port by TPROXY, keeping its
// destination, and dropped when no transparent socket listens there, as
// iptables' TPROXY does: nft's tproxy falls through instead, which would let
// traffic reach the app around a stopped proxy.
func tproxyRules(cfg Config) [][]expr.Any {
	rules := [][]expr.Any{
		rule(notTCP(), ret()),
		rule(ifname(expr.MetaKeyIIFNAME, "lo"), ret()),
	}
	for _, p := range cfg.inboundExcluded() {
		rules = append(rules, rule(dport(p), ret()))
	}
	return append(rules,
		rule(socketTransparent(), setMark(cfg.TProxyMark), verdict(expr.VerdictAccept)),
		rule(ctStateIn(expr.CtStateBitESTABLISHED|expr.CtStateBitRELATED), ret()),
		rule(nfproto(unix.NFPROTO_IPV4), isTCP(), tproxyTo(unix.NFPROTO_IPV4, cfg.InboundPort), setMark(cfg.TProxyMark), verdict(expr.VerdictAccept)),
		rule(nfproto(unix.NFPROTO_IPV6), isTCP(), tproxyTo(unix.NFPROTO_IPV6, cfg.InboundPort), setMark(cfg.TProxyMark), verdict(expr.VerdictAccept)),
		rule(isTCP(), verdict(expr.VerdictDrop)),
	)
}

// upstreamRules: the proxy reaches the app from the client's address on a
// socket marked cfg.TProxyMark (DialTransparent). Its packets store the
// mark in their connection; the app's replies, addressed to the client, get
// it back and so are routed by the fwmark rule to the local table, hence to
// the proxy, instead of out to the real client.
func upstreamRules(cfg Config) [][]expr.Any {
	return [][]expr.Any{
		rule(notTCP(), ret()),
		rule(metaU32(expr.MetaKeyMARK, cfg.TProxyMark), setCtMark(cfg.TProxyMark)),
		rule(ctMark(cfg.TProxyMark), setMark(cfg.TProxyMark)),
	}
}

// rule joins expression groups and counts matches (status shows them).
func rule(parts ...[]expr.Any) []expr.Any {
	var out []expr.Any
	for _, p := range parts[:len(parts)-1] {
		out = append(out, p...)
	}
	out = append(out, &expr.Counter{})
	return append(out, parts[len(parts)-1]...)
}

func ret() []expr.Any { return verdict(expr.VerdictReturn) }

func verdict(k expr.VerdictKind) []expr.Any { return []expr.Any{&expr.Verdict{Kind: k}} }

func notTCP() []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: []byte{unix.IPPROTO_TCP}},
	}
}

// isTCP is redundant after notTCP's return, but nft's parser wants it next
// to port matches, redirect and tproxy, so `nft list` output reloads.
func isTCP() []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_TCP}},
	}
}

func nfproto(p byte) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{p}},
	}
}

func metaU32(k expr.MetaKey, v uint32) []expr.Any {
	b := make([]byte, 4)
	nativeEndian.PutUint32(b, v)
	return []expr.Any{
		&expr.Meta{Key: k, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: b},
	}
}

func ifname(k expr.MetaKey, name string) []expr.Any {
	b := make([]byte, unix.IFNAMSIZ)
	copy(b, name)
	return []expr.Any{
		&expr.Meta{Key: k, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: b},
	}
}

// dport matches TCP destination port p (the chains only see TCP here).
func dport(p uint16) []expr.Any {
	return append(isTCP(),
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: be16(p)},
	)
}

// daddr matches the IP destination address against prefix p.
func daddr(p netip.Prefix) []expr.Any {
	fam, off := byte(unix.NFPROTO_IPV4), uint32(16)
	if p.Addr().Is6() {
		fam, off = unix.NFPROTO_IPV6, 24
	}
	addr := p.Addr().AsSlice()
	out := append(nfproto(fam),
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: uint32(len(addr))})
	if p.Bits() < p.Addr().BitLen() {
		mask := prefixMask(p.Bits(), len(addr))
		out = append(out, &expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: uint32(len(addr)),
			Mask: mask, Xor: make([]byte, len(addr))})
	}
	return append(out, &expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: addr})
}

func redirectTo(port uint16) []expr.Any {
	return []expr.Any{
		&expr.Immediate{Register: 1, Data: be16(port)},
		&expr.Redir{RegisterProtoMin: 1},
	}
}

func tproxyTo(family byte, port uint16) []expr.Any {
	return []expr.Any{
		&expr.Immediate{Register: 1, Data: be16(port)},
		&expr.TProxy{Family: family, TableFamily: byte(nftables.TableFamilyINet), RegPort: 1},
	}
}

func setMark(mark uint32) []expr.Any {
	b := make([]byte, 4)
	nativeEndian.PutUint32(b, mark)
	return []expr.Any{
		&expr.Immediate{Register: 1, Data: b},
		&expr.Meta{Key: expr.MetaKeyMARK, SourceRegister: true, Register: 1},
	}
}

func setCtMark(mark uint32) []expr.Any {
	b := make([]byte, 4)
	nativeEndian.PutUint32(b, mark)
	return []expr.Any{
		&expr.Immediate{Register: 1, Data: b},
		&expr.Ct{Key: expr.CtKeyMARK, SourceRegister: true, Register: 1},
	}
}

// ctStateIn matches a connection in any of the states bits.
func ctStateIn(bits uint32) []expr.Any {
	b := make([]byte, 4)
	nativeEndian.PutUint32(b, bits)
	return []expr.Any{
		&expr.Ct{Key: expr.CtKeySTATE, Register: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: b, Xor: make([]byte, 4)},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: make([]byte, 4)},
	}
}

func ctMark(mark uint32) []expr.Any {
	b := make([]byte, 4)
	nativeEndian.PutUint32(b, mark)
	return []expr.Any{
		&expr.Ct{Key: expr.CtKeyMARK, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: b},
	}
}

func socketTransparent() []expr.Any {
	return []expr.Any{
		&expr.Socket{Key: expr.SocketKeyTransparent, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{1}},
	}
}

func prefixMask(bits, size int) []byte {
	m := make([]byte, size)
	for i := range m {
		switch {
		case bits >= 8:
			m[i] = 0xff
			bits -= 8
		case bits > 0:
			m[i] = byte(0xff << (8 - bits))
			bits = 0
		}
	}
	return m
}

func be16(v uint16) []byte { return []byte{byte(v >> 8), byte(v)} }

// liveNftables reads table inet meshproxy; nil, nil if it does not exist.
func liveNftables(c *nftables.Conn) (*nftables.Table, []nftChain, error) {
	table, err := c.ListTableOfFamily(TableName, nftables.TableFamilyINet)
	if err != nil {
		if errors.Is(err, unix.ENOENT) {
			return nil, nil, nil
		}
		return nil, nil, permission(fmt.Errorf("list nftables table inet %s: %w", TableName, err), "CAP_NET_ADMIN")
	}
	all, err := c.ListChainsOfTableFamily(nftables.TableFamilyINet)
	if err != nil {
		return nil, nil, fmt.Errorf("list nftables chains: %w", err)
	}
	var chains []nftChain
	for _, ch := range all {
		if ch.Table.Name != TableName {
			continue
		}
		rules, err := c.GetRules(table, ch)
		if err != nil {
			return nil, nil, fmt.Errorf("list rules of chain %s: %w", ch.Name, err)
		}
		nc := nftChain{chain: ch}
		for _, r := range rules {
			comment, _ := userdata.GetString(r.UserData, userdata.TypeComment)
			nc.rules = append(nc.rules, nftRule{exprs: r.Exprs, comment: comment})
		}
		chains = append(chains, nc)
	}
	slices.SortFunc(chains, func(a, b nftChain) int { return cmpString(a.chain.Name, b.chain.Name) })
	return table, chains, nil
}

// sameNftables compares chain headers and rule comments.
func sameNftables(a, b []nftChain) bool {
	render := func(cs []nftChain) []string {
		var out []string
		for _, c := range cs {
			out = append(out, chainHeader(c.chain))
			for _, r := range c.rules {
				out = append(out, r.comment)
			}
		}
		return out
	}
	sorted := slices.Clone(b)
	slices.SortFunc(sorted, func(x, y nftChain) int { return cmpString(x.chain.Name, y.chain.Name) })
	a = slices.Clone(a)
	slices.SortFunc(a, func(x, y nftChain) int { return cmpString(x.chain.Name, y.chain.Name) })
	return slices.Equal(render(a), render(sorted))
}

func cmpString(a, b string) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// applyNftables makes table inet meshproxy hold exactly cfg's chains in one
// atomic batch. It reports whether anything changed.
func applyNftables(cfg Config) (changed bool, err error) {
	c, err := nftables.New()
	if err != nil {
		return false, fmt.Errorf("open nftables netlink: %w", err)
	}
	table, want := desiredNftables(cfg)
	live, liveChains, err := liveNftables(c)
	if err != nil {
		return false, err
	}
	if live != nil && sameNftables(liveChains, want) {
		return false, nil
	}
	if live != nil {
		c.DelTable(live) // replaced in the same batch: never half old, half new
	}
	c.AddTable(table)
	for _, ch := range want {
		c.AddChain(ch.chain)
		for _, r := range ch.rules {
			c.AddRule(&nftables.Rule{Table: table, Chain: ch.chain, Exprs: r.exprs,
				UserData: userdata.AppendString(nil, userdata.TypeComment, r.comment)})
		}
	}
	if err := c.Flush(); err != nil {
		return false, nftError(err)
	}
	return true, nil
}

// nftError names the likely cause of a failed nftables batch.
func nftError(err error) error {
	switch {
	case errors.Is(err, unix.EPERM), errors.Is(err, unix.EACCES):
		return permission(fmt.Errorf("apply nftables batch: %w", err), "CAP_NET_ADMIN")
	case errors.Is(err, unix.ENOENT), errors.Is(err, unix.EOPNOTSUPP), errors.Is(err, unix.EPROTONOSUPPORT), errors.Is(err, unix.EAFNOSUPPORT):
		return fmt.Errorf("%w: nftables nat/tproxy/socket support (nf_tables, nft_nat, nft_redir, nft_tproxy, nft_socket): %w", ErrUnsupported, err)
	}
	return fmt.Errorf("apply nftables batch: %w", err)
}

// deleteNftables removes table inet meshproxy if it exists.
func deleteNftables() error {
	c, err := nftables.New()
	if err != nil {
		return fmt.Errorf("open nftables netlink: %w", err)
	}
	live, _, err := liveNftables(c)
	if err != nil || live == nil {
		return err
	}
	c.DelTable(live)
	if err := c.Flush(); err != nil && !errors.Is(err, unix.ENOENT) {
		return permission(fmt.Errorf("delete nftables table inet %s: %w", TableName, err), "CAP_NET_ADMIN")
	}
	return nil
}

func installNftables(_ context.Context, cfg Config) error {
	changed, err := applyNftables(cfg)
	if err != nil {
		return err
	}
	if cfg.TProxy {
		if err := installTProxyRoutes(cfg); err != nil {
			if changed {
				_ = deleteNftables()
			}
			return err
		}
	} else if err := uninstallTProxyRoutes(cfg); err != nil {
		return err
	}
	return nil
}

func uninstallNftables(_ context.Context, cfg Config) error {
	return errors.Join(deleteNftables(), uninstallTProxyRoutes(cfg))
}

func statusNftables(_ context.Context, cfg Config, st *State) error {
	secs, present, err := nftablesSections()
	if err != nil {
		return err
	}
	st.Sections = append(st.Sections, secs...)
	if cfg.TProxy {
		st.Mechanisms = append(st.Mechanisms, Mechanism{Direction: "inbound",
			How:       fmt.Sprintf("nftables inet %s chain %s (prerouting, mangle priority): TPROXY to :%d, mark %#x; dropped while nothing listens there", TableName, chainTProxy, cfg.InboundPort, cfg.TProxyMark),
			Installed: present[chainTProxy]})
		routes, ok, err := tproxyRoutesStatus(cfg)
		if err != nil {
			return err
		}
		st.Mechanisms = append(st.Mechanisms, Mechanism{Direction: "inbound",
			How:       fmt.Sprintf("nftables inet %s chain %s (route output, mangle priority): proxy→app connections marked %#x keep it in ct mark; the app's replies get it back and return to the proxy", TableName, chainUpstream, cfg.TProxyMark),
			Installed: present[chainUpstream]})
		st.Mechanisms = append(st.Mechanisms, Mechanism{Direction: "inbound",
			How:       fmt.Sprintf("policy routing: fwmark %#x → table %d (local default route via lo)", cfg.TProxyMark, cfg.RouteTable),
			Installed: ok})
		st.Sections = append(st.Sections, routes...)
	} else {
		st.Mechanisms = append(st.Mechanisms, Mechanism{Direction: "inbound",
			How:       fmt.Sprintf("nftables inet %s chain %s (nat prerouting): redirect to :%d", TableName, chainInbound, cfg.InboundPort),
			Installed: present[chainInbound]})
	}
	if cfg.Mode == ModeNftables {
		st.Mechanisms = append([]Mechanism{{Direction: "outbound",
			How:       fmt.Sprintf("nftables inet %s chain %s (nat output): redirect to :%d", TableName, chainOutbound, cfg.OutboundPort),
			Installed: present[chainOutbound]}}, st.Mechanisms...)
	}
	return nil
}

// nftablesSections renders the live table, one section a chain.
func nftablesSections() ([]Section, map[string]bool, error) {
	c, err := nftables.New()
	if err != nil {
		return nil, nil, fmt.Errorf("open nftables netlink: %w", err)
	}
	_, chains, err := liveNftables(c)
	if err != nil {
		return nil, nil, err
	}
	present := map[string]bool{}
	var secs []Section
	for _, ch := range chains {
		present[ch.chain.Name] = true
		sec := Section{Title: fmt.Sprintf("table inet %s chain %s  # %s", TableName, ch.chain.Name, chainHeader(ch.chain))}
		for _, r := range ch.rules {
			line := r.comment
			if line == "" { // not ours: show what we can parse
				line = renderRule(r.exprs, false)
			}
			for _, e := range r.exprs {
				if c, ok := e.(*expr.Counter); ok {
					line += fmt.Sprintf("  [%d packets, %d bytes]", c.Packets, c.Bytes)
				}
			}
			sec.Lines = append(sec.Lines, line)
		}
		secs = append(secs, sec)
	}
	return secs, present, nil
}
