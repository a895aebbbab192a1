package redirect

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"syscall"

	"golang.org/x/sys/unix"
)

// soOriginalDst is SO_ORIGINAL_DST (SOL_IP) and IP6T_SO_ORIGINAL_DST
// (SOL_IPV6); both are 80.
const soOriginalDst = 80

// OriginalDst returns where an accepted, captured connection was going:
//
//   - nftables/iptables REDIRECT: SO_ORIGINAL_DST (IPv4, also for IPv4
//     peers on a dual-stack socket) or IP6T_SO_ORIGINAL_DST (IPv6), from
//     conntrack;
//   - TPROXY: the socket's own local address (the listener is transparent);
//   - ebpf: the same getsockopt, answered by the cgroup/getsockopt program
//     from the map the connect hook filled.
//
// A connection made straight to the proxy's port has no other destination;
// OriginalDst returns ErrNotRedirected for it rather than the proxy's own
// address, which would make the proxy connect to itself.
func OriginalDst(conn net.Conn) (netip.AddrPort, error) {
	sc, ok := conn.(syscall.Conn)
	if !ok {
		return netip.AddrPort{}, fmt.Errorf("original destination: %T is not a socket", conn)
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("original destination: %w", err)
	}
	local, err := addrPortOf(conn.LocalAddr())
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("original destination: %w", err)
	}
	var (
		dst         netip.AddrPort
		gerr        error
		transparent bool
	)
	if err := raw.Control(func(fd uintptr) {
		dst, gerr = getOriginalDst(int(fd), local)
		transparent = isTransparent(int(fd))
	}); err != nil {
		return netip.AddrPort{}, fmt.Errorf("original destination: %w", err)
	}
	switch {
	case gerr == nil && dst != local:
		return dst, nil
	case transparent:
		return local, nil
	case gerr == nil:
		return netip.AddrPort{}, fmt.Errorf("original destination of %s: %w (it was addressed to the proxy itself)", conn.RemoteAddr(), ErrNotRedirected)
	case errors.Is(gerr, unix.ENOENT):
		return netip.AddrPort{}, fmt.Errorf("original destination of %s: %w (no conntrack entry or eBPF record)", conn.RemoteAddr(), ErrNotRedirected)
	}
	return netip.AddrPort{}, fmt.Errorf("original destination of %s: %w", conn.RemoteAddr(), gerr)
}

// getOriginalDst asks the kernel (conntrack, or our getsockopt program) for
// the original destination.
func getOriginalDst(fd int, local netip.AddrPort) (netip.AddrPort, error) {
	if local.Addr().Is4() { // also IPv4 peers of a dual-stack socket
		// sockaddr_in (16 bytes) fits the 20-byte ipv6_mreq buffer.
		m, err := unix.GetsockoptIPv6Mreq(fd, unix.SOL_IP, soOriginalDst)
		if err != nil {
			return netip.AddrPort{}, fmt.Errorf("getsockopt SO_ORIGINAL_DST: %w", err)
		}
		b := m.Multiaddr
		if fam := nativeEndian.Uint16(b[0:2]); fam != unix.AF_INET {
			return netip.AddrPort{}, fmt.Errorf("getsockopt SO_ORIGINAL_DST: address family %d, want AF_INET", fam)
		}
		return netip.AddrPortFrom(netip.AddrFrom4([4]byte(b[4:8])), binary.BigEndian.Uint16(b[2:4])), nil
	}
	// sockaddr_in6 (28 bytes) fits the 32-byte ip6_mtuinfo buffer.
	mi, err := unix.GetsockoptIPv6MTUInfo(fd, unix.SOL_IPV6, soOriginalDst)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("getsockopt IP6T_SO_ORIGINAL_DST: %w", err)
	}
	if mi.Addr.Family != unix.AF_INET6 {
		return netip.AddrPort{}, fmt.Errorf("getsockopt IP6T_SO_ORIGINAL_DST: address family %d, want AF_INET6", mi.Addr.Family)
	}
	var pb [2]byte
	nativeEndian.PutUint16(pb[:], mi.Addr.Port) // the field holds network byte order
	return netip.AddrPortFrom(netip.AddrFrom16(mi.Addr.Addr).Unmap(), binary.BigEndian.Uint16(pb[:])), nil
}

func addrPortOf(a net.Addr) (netip.AddrPort, error) {
	ta, ok := a.(*net.TCPAddr)
	if !ok {
		return netip.AddrPort{}, fmt.Errorf("local address %v is not TCP", a)
	}
	ap := ta.AddrPort()
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()), nil
}
