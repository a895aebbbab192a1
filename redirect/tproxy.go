package redirect

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"syscall"

	"github.com/meshproxy/meshproxy/internal/localtcp"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// tproxyRoutes returns the policy rules and local routes TPROXY needs, one
// of each per family: packets marked cfg.TProxyMark look up cfg.RouteTable,
// whose default route delivers everything locally.
func tproxyRoutes(cfg Config) ([]*netlink.Rule, []*netlink.Route, error) {
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		return nil, nil, fmt.Errorf("find loopback interface: %w", err)
	}
	var rules []*netlink.Rule
	var routes []*netlink.Route
	fams := []int{netlink.FAMILY_V4}
	if ipv6Enabled() {
		fams = append(fams, netlink.FAMILY_V6)
	}
	for _, fam := range fams {
		r := netlink.NewRule()
		r.Family = fam
		r.Mark = cfg.TProxyMark
		r.Mask = ptr(uint32(0xffffffff))
		r.Table = cfg.RouteTable
		rules = append(rules, r)
		dst := &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)}
		if fam == netlink.FAMILY_V6 {
			dst = &net.IPNet{IP: net.IPv6zero, Mask: net.CIDRMask(0, 128)}
		}
		routes = append(routes, &netlink.Route{Family: fam, Dst: dst, Type: unix.RTN_LOCAL,
			Scope: netlink.SCOPE_HOST, Table: cfg.RouteTable, LinkIndex: lo.Attrs().Index})
	}
	return rules, routes, nil
}

func ptr[T any](v T) *T { return &v }

// ipv6Enabled reports whether the kernel (and this namespace) has IPv6; on
// a host booted with ipv6.disable=1 the IPv6 half of the capture is skipped.
func ipv6Enabled() bool {
	_, err := os.Stat("/proc/sys/net/ipv6")
	return err == nil
}

// ipFamilies returns 4, and 6 when IPv6 is enabled.
func ipFamilies() []int {
	if ipv6Enabled() {
		return []int{4, 6}
	}
	return []int{4}
}

// findRule returns the live rule equal to want (mark, mask, table, family).
func findRule(want *netlink.Rule) (*netlink.Rule, error) {
	live, err := netlink.RuleListFiltered(want.Family, &netlink.Rule{Table: want.Table},
		netlink.RT_FILTER_TABLE)
	if err != nil {
		return nil, fmt.Errorf("list ip rules: %w", err)
	}
	for i := range live {
		r := &live[i]
		if r.Mark == want.Mark && r.Mask != nil && *r.Mask == *want.Mask && !r.Invert {
			return r, nil
		}
	}
	return nil, nil
}

// findRoute returns the live route equal to want in its table.
func findRoute(want *netlink.Route) (*netlink.Route, error) {
	live, err := netlink.RouteListFiltered(want.Family, &netlink.Route{Table: want.Table},
		netlink.RT_FILTER_TABLE)
	if err != nil {
		return nil, fmt.Errorf("list routes of table %d: %w", want.Table, err)
	}
	for i := range live {
		r := &live[i]
		if r.Type == unix.RTN_LOCAL && r.LinkIndex == want.LinkIndex && r.Dst != nil && r.Dst.String() == want.Dst.String() {
			return r, nil
		}
		if r.Type == unix.RTN_LOCAL && r.LinkIndex == want.LinkIndex && r.Dst == nil {
			return r, nil // the kernel reports a default route without Dst
		}
	}
	return nil, nil
}

// installTProxyRoutes adds what is missing; on failure it removes what this
// call added.
func installTProxyRoutes(cfg Config) error {
	rules, routes, err := tproxyRoutes(cfg)
	if err != nil {
		return err
	}
	var undo []func()
	rollback := func() {
		for i := len(undo) - 1; i >= 0; i-- {
			undo[i]()
		}
	}
	for _, r := range routes {
		live, err := findRoute(r)
		if err != nil {
			rollback()
			return err
		}
		if live != nil {
			continue
		}
		if err := netlink.RouteAdd(r); err != nil {
			rollback()
			return permission(fmt.Errorf("add local default route to table %d: %w", r.Table, err), "CAP_NET_ADMIN")
		}
		undo = append(undo, func() { _ = netlink.RouteDel(r) })
	}
	for _, r := range rules {
		live, err := findRule(r)
		if err != nil {
			rollback()
			return err
		}
		if live != nil {
			continue
		}
		if err := netlink.RuleAdd(r); err != nil {
			rollback()
			if errors.Is(err, unix.EAFNOSUPPORT) || errors.Is(err, unix.EOPNOTSUPP) {
				return fmt.Errorf("%w: policy routing (CONFIG_IP_MULTIPLE_TABLES / IPV6_MULTIPLE_TABLES): %w", ErrUnsupported, err)
			}
			return permission(fmt.Errorf("add ip rule fwmark %#x lookup %d: %w", r.Mark, r.Table, err), "CAP_NET_ADMIN")
		}
		undo = append(undo, func() { _ = netlink.RuleDel(r) })
	}
	return nil
}

// uninstallTProxyRoutes removes our rules and routes if present.
func uninstallTProxyRoutes(cfg Config) error {
	rules, routes, err := tproxyRoutes(cfg)
	if err != nil {
		return err
	}
	var errs []error
	for _, r := range rules {
		live, err := findRule(r)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if live != nil {
			if err := netlink.RuleDel(live); err != nil {
				errs = append(errs, permission(fmt.Errorf("delete ip rule fwmark %#x: %w", r.Mark, err), "CAP_NET_ADMIN"))
			}
		}
	}
	for _, r := range routes {
		live, err := findRoute(r)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if live != nil {
			if err := netlink.RouteDel(live); err != nil {
				errs = append(errs, permission(fmt.Errorf("delete local route of table %d: %w", r.Table, err), "CAP_NET_ADMIN"))
			}
		}
	}
	return errors.Join(errs...)
}

// tproxyRoutesStatus renders the live policy routing and reports whether it
// is complete.
func tproxyRoutesStatus(cfg Config) ([]Section, bool, error) {
	rules, routes, err := tproxyRoutes(cfg)
	if err != nil {
		return nil, false, err
	}
	sec := Section{Title: fmt.Sprintf("policy routing (table %d)", cfg.RouteTable)}
	ok := true
	for _, r := range rules {
		live, err := findRule(r)
		if err != nil {
			return nil, false, err
		}
		fam := famName(r.Family)
		if live == nil {
			ok = false
			continue
		}
		sec.Lines = append(sec.Lines, fmt.Sprintf("%s rule: fwmark %#x/%#x lookup %d (priority %d)", fam, live.Mark, *live.Mask, live.Table, live.Priority))
	}
	for _, r := range routes {
		live, err := findRoute(r)
		if err != nil {
			return nil, false, err
		}
		if live == nil {
			ok = false
			continue
		}
		sec.Lines = append(sec.Lines, fmt.Sprintf("%s route: local %s dev lo table %d", famName(r.Family), r.Dst, r.Table))
	}
	if len(sec.Lines) == 0 {
		return nil, false, nil
	}
	return []Section{sec}, ok, nil
}

func famName(f int) string {
	if f == netlink.FAMILY_V6 {
		return "ipv6"
	}
	return "ipv4"
}

// ListenTransparent listens on addr ("tcp", "tcp4" or "tcp6") with
// IP_TRANSPARENT (and IPV6_TRANSPARENT) set, as TPROXY capture needs: the
// accepted connections' local address is the original destination. It needs
// CAP_NET_ADMIN (or CAP_NET_RAW).
func ListenTransparent(ctx context.Context, network, addr string) (net.Listener, error) {
	switch network {
	case "tcp", "tcp4", "tcp6":
	default:
		return nil, fmt.Errorf("listen transparent on %s: network %q is not tcp, tcp4 or tcp6", addr, network)
	}
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) {
			// One flag serves both families; set it at the socket's level.
			level, opt := unix.SOL_IP, unix.IP_TRANSPARENT
			if d, e := unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_DOMAIN); e == nil && d == unix.AF_INET6 {
				level, opt = unix.SOL_IPV6, unix.IPV6_TRANSPARENT
			}
			serr = unix.SetsockoptInt(int(fd), level, opt, 1)
		})
		if err != nil {
			return err
		}
		if serr != nil {
			return permission(fmt.Errorf("set IP_TRANSPARENT: %w", serr), "CAP_NET_ADMIN")
		}
		return nil
	}}
	ln, err := lc.Listen(ctx, network, addr)
	if err != nil {
		return nil, fmt.Errorf("listen transparent on %s: %w", addr, err)
	}
	return ln, nil
}

// isTransparent reports whether the socket has IP_TRANSPARENT or
// IPV6_TRANSPARENT set (accepted sockets inherit it from the listener).
func isTransparent(fd int) bool {
	if v, err := unix.GetsockoptInt(fd, unix.SOL_IP, unix.IP_TRANSPARENT); err == nil && v != 0 {
		return true
	}
	v, err := unix.GetsockoptInt(fd, unix.SOL_IPV6, unix.IPV6_TRANSPARENT)
	return err == nil && v != 0
}

// errSourcePortTaken: the kernel gave the transparent socket the client's
// own port; DialTransparent tries again with a fresh socket.
var errSourcePortTaken = errors.New("source port equals the client's port")

// transparentDialAttempts bounds the retries after errSourcePortTaken (the
// kernel picks ports at random, so a second clash is already unlikely).
const transparentDialAttempts = 4

// DialTransparent connects to dst (an IP:port, normally the app behind
// TPROXY capture) from client's IP address, so the app sees the real client
// as its peer, as Envoy's original_src does. The socket has IP_TRANSPARENT
// (to bind an address that is not local) and SO_MARK mark, both of which
// need CAP_NET_ADMIN. The capture installed with TProxy (same mark) sends
// the app's replies, which are addressed to the client, back to this socket:
// the connection keeps the mark, and the fwmark rule routes it locally.
//
// The source port is the kernel's choice, but never client's own port: that
// connection (client → dst) is the one the proxy accepted, and a second one
// with the same addresses and ports would be delivered to the proxy's
// accepted socket instead of the app.
func DialTransparent(ctx context.Context, client netip.AddrPort, dst string, mark uint32) (net.Conn, error) {
	src := client.Addr().Unmap()
	if !src.IsValid() || src.IsUnspecified() {
		return nil, fmt.Errorf("dial %s transparently: no client address (%v)", dst, client)
	}
	to, err := netip.ParseAddrPort(dst)
	if err != nil {
		return nil, fmt.Errorf("dial %s transparently: destination is not IP:port: %w", dst, err)
	}
	to = netip.AddrPortFrom(to.Addr().Unmap(), to.Port())
	if to.Addr().Is4() != src.Is4() {
		return nil, fmt.Errorf("dial %s transparently from %s: address families differ", to, src)
	}
	network, level, opt := "tcp4", unix.SOL_IP, unix.IP_TRANSPARENT
	if src.Is6() {
		network, level, opt = "tcp6", unix.SOL_IPV6, unix.IPV6_TRANSPARENT
	}
	var last error
	for range transparentDialAttempts {
		// No LocalAddr: Control binds, so it can check the port before connect.
		d := net.Dialer{Control: func(_, _ string, c syscall.RawConn) error {
			var serr error
			err := c.Control(func(fd uintptr) {
				serr = prepareTransparent(int(fd), level, opt, mark, src, client.Port())
				localtcp.Tune(int(fd)) // to the app of this workload: unpaced
			})
			if err != nil {
				return err
			}
			return serr
		}}
		conn, err := d.DialContext(ctx, network, to.String())
		if err == nil {
			return conn, nil
		}
		last = err
		if !errors.Is(err, errSourcePortTaken) {
			break
		}
	}
	return nil, fmt.Errorf("dial %s transparently from %s: %w", to, src, last)
}

// prepareTransparent sets IP_TRANSPARENT and SO_MARK on fd and binds it to
// src with a port the kernel picks, refusing avoid.
func prepareTransparent(fd, level, opt int, mark uint32, src netip.Addr, avoid uint16) error {
	if err := unix.SetsockoptInt(fd, level, opt, 1); err != nil {
		return permission(fmt.Errorf("set IP_TRANSPARENT: %w", err), "CAP_NET_ADMIN")
	}
	if mark != 0 {
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_MARK, int(mark)); err != nil {
			return permission(fmt.Errorf("set SO_MARK %#x: %w", mark, err), "CAP_NET_ADMIN")
		}
	}
	var sa unix.Sockaddr
	if src.Is4() {
		sa = &unix.SockaddrInet4{Addr: src.As4()}
	} else {
		sa = &unix.SockaddrInet6{Addr: src.As16()}
	}
	if err := unix.Bind(fd, sa); err != nil {
		return fmt.Errorf("bind %s: %w", src, err)
	}
	bound, err := unix.Getsockname(fd)
	if err != nil {
		return fmt.Errorf("getsockname: %w", err)
	}
	var port int
	switch a := bound.(type) {
	case *unix.SockaddrInet4:
		port = a.Port
	case *unix.SockaddrInet6:
		port = a.Port
	}
	if port == int(avoid) {
		return errSourcePortTaken
	}
	return nil
}
