package mesh

import (
	"fmt"
	"net"
	"net/netip"

	"github.com/meshproxy/meshproxy/tlsmgr"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// AddrPort converts the net.Addr of a TCP socket, with an IPv4-mapped IPv6
// address turned into plain IPv4; the zero AddrPort if it has none.
func AddrPort(a net.Addr) netip.AddrPort {
	var ap netip.AddrPort
	if ta, ok := a.(*net.TCPAddr); ok {
		ap = ta.AddrPort()
	} else {
		ap, _ = netip.ParseAddrPort(a.String())
	}
	return Unmap(ap)
}

// Unmap turns an IPv4-mapped IPv6 address into plain IPv4.
func Unmap(ap netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

// TrustDomain is td if set, else the trust domain of src's current SVID:
// the one a data plane's mesh destinations must belong to when no SPIFFE ID
// is expected.
func TrustDomain(td spiffeid.TrustDomain, src x509svid.Source) (spiffeid.TrustDomain, error) {
	if !td.IsZero() {
		return td, nil
	}
	svid, err := src.GetX509SVID()
	if err != nil {
		return spiffeid.TrustDomain{}, fmt.Errorf("current svid: %w", err)
	}
	if svid == nil {
		return spiffeid.TrustDomain{}, tlsmgr.ErrNoIdentity
	}
	return svid.ID.TrustDomain(), nil
}
