package redirect

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

var nativeEndian = binary.NativeEndian

// chainHeader renders a base chain's type, hook and priority as nft does.
func chainHeader(c *nftables.Chain) string {
	hooks := map[nftables.ChainHook]string{
		*nftables.ChainHookPrerouting:  "prerouting",
		*nftables.ChainHookInput:       "input",
		*nftables.ChainHookForward:     "forward",
		*nftables.ChainHookOutput:      "output",
		*nftables.ChainHookPostrouting: "postrouting",
	}
	if c.Hooknum == nil {
		return "regular chain"
	}
	prio := 0
	if c.Priority != nil {
		prio = int(*c.Priority)
	}
	return fmt.Sprintf("type %s hook %s priority %d", c.Type, hooks[*c.Hooknum], prio)
}

// renderRule renders the expressions we generate in nft's syntax, so status
// output reads like `nft list table`. With counters it includes the packet
// and byte counts. Unknown expressions are shown by type, never dropped.
func renderRule(exprs []expr.Any, counters bool) string {
	var out []string
	// What the last load into register 1 was, for the cmp that follows.
	var load string
	var loadLen int
	var mask []byte
	for _, e := range exprs {
		switch e := e.(type) {
		case *expr.Meta:
			if e.SourceRegister {
				out = append(out, "meta "+metaName(e.Key)+" set "+load)
				continue
			}
			load, loadLen, mask = "meta "+metaName(e.Key), 0, nil
		case *expr.Payload:
			load, loadLen, mask = payloadName(e), int(e.Len), nil
		case *expr.Bitwise:
			mask = e.Mask
		case *expr.Socket:
			load, mask = "socket "+socketName(e.Key), nil
		case *expr.Ct:
			if e.SourceRegister {
				out = append(out, "ct "+ctName(e.Key)+" set "+load)
				continue
			}
			load, loadLen, mask = "ct "+ctName(e.Key), 0, nil
		case *expr.Cmp:
			if load == "ct state" && mask != nil && e.Op == expr.CmpOpNeq && len(e.Data) == 4 && nativeEndian.Uint32(e.Data) == 0 {
				out = append(out, "ct state "+ctStates(mask))
				continue
			}
			op := ""
			if e.Op == expr.CmpOpNeq {
				op = "!= "
			}
			out = append(out, load+" "+op+cmpValue(load, e.Data, loadLen, mask))
		case *expr.Immediate:
			load = immValue(e.Data)
		case *expr.Redir:
			out = append(out, "redirect to :"+strings.TrimPrefix(load, "0x"))
		case *expr.TProxy:
			fam := "ip"
			if e.Family == unix.NFPROTO_IPV6 {
				fam = "ip6"
			}
			out = append(out, "tproxy "+fam+" to :"+load)
		case *expr.Counter:
			if counters {
				out = append(out, fmt.Sprintf("counter packets %d bytes %d", e.Packets, e.Bytes))
			} else {
				out = append(out, "counter")
			}
		case *expr.Verdict:
			out = append(out, verdictName(e))
		default:
			out = append(out, fmt.Sprintf("<%T>", e))
		}
	}
	// nft's own shorthand: a port match implies the protocol.
	return strings.ReplaceAll(strings.Join(out, " "), "meta l4proto tcp tcp dport", "tcp dport")
}

func metaName(k expr.MetaKey) string {
	switch k {
	case expr.MetaKeyL4PROTO:
		return "l4proto"
	case expr.MetaKeyNFPROTO:
		return "nfproto"
	case expr.MetaKeySKUID:
		return "skuid"
	case expr.MetaKeySKGID:
		return "skgid"
	case expr.MetaKeyIIFNAME:
		return "iifname"
	case expr.MetaKeyOIFNAME:
		return "oifname"
	case expr.MetaKeyMARK:
		return "mark"
	}
	return fmt.Sprintf("key%d", k)
}

func ctName(k expr.CtKey) string {
	switch k {
	case expr.CtKeyMARK:
		return "mark"
	case expr.CtKeySTATE:
		return "state"
	}
	return fmt.Sprintf("key%d", k)
}

// ctStates renders a ct state bit mask as nft does ("established,related").
func ctStates(mask []byte) string {
	if len(mask) != 4 {
		return fmt.Sprintf("%x", mask)
	}
	bits := nativeEndian.Uint32(mask)
	var names []string
	for _, s := range []struct {
		bit  uint32
		name string
	}{{expr.CtStateBitINVALID, "invalid"}, {expr.CtStateBitESTABLISHED, "established"},
		{expr.CtStateBitRELATED, "related"}, {expr.CtStateBitNEW, "new"}, {expr.CtStateBitUNTRACKED, "untracked"}} {
		if bits&s.bit != 0 {
			names = append(names, s.name)
			bits &^= s.bit
		}
	}
	if bits != 0 {
		names = append(names, fmt.Sprintf("%#x", bits))
	}
	return strings.Join(names, ",")
}

func socketName(k expr.SocketKey) string {
	if k == expr.SocketKeyTransparent {
		return "transparent"
	}
	return fmt.Sprintf("key%d", k)
}

func payloadName(p *expr.Payload) string {
	switch {
	case p.Base == expr.PayloadBaseTransportHeader && p.Offset == 2 && p.Len == 2:
		return "tcp dport"
	case p.Base == expr.PayloadBaseNetworkHeader && p.Offset == 16 && p.Len == 4:
		return "ip daddr"
	case p.Base == expr.PayloadBaseNetworkHeader && p.Offset == 24 && p.Len == 16:
		return "ip6 daddr"
	}
	return fmt.Sprintf("payload base %d offset %d len %d", p.Base, p.Offset, p.Len)
}

func cmpValue(load string, data []byte, n int, mask []byte) string {
	switch {
	case load == "meta l4proto" && len(data) == 1:
		if data[0] == unix.IPPROTO_TCP {
			return "tcp"
		}
		return fmt.Sprint(data[0])
	case load == "meta nfproto" && len(data) == 1:
		switch data[0] {
		case unix.NFPROTO_IPV4:
			return "ipv4"
		case unix.NFPROTO_IPV6:
			return "ipv6"
		}
	case (load == "meta skuid" || load == "meta skgid") && len(data) == 4:
		return fmt.Sprint(nativeEndian.Uint32(data))
	case (load == "meta mark" || load == "ct mark") && len(data) == 4:
		return fmt.Sprintf("%#x", nativeEndian.Uint32(data))
	case strings.HasSuffix(load, "ifname"):
		return fmt.Sprintf("%q", strings.TrimRight(string(data), "\x00"))
	case load == "tcp dport" && len(data) == 2:
		return fmt.Sprint(binary.BigEndian.Uint16(data))
	case (load == "ip daddr" || load == "ip6 daddr") && (n == 4 || n == 16) && len(data) == n:
		a, _ := netip.AddrFromSlice(data)
		bits := a.BitLen()
		if mask != nil {
			bits = 0
			for _, b := range mask {
				for ; b != 0; b <<= 1 {
					bits++
				}
			}
		}
		return netip.PrefixFrom(a, bits).String()
	case strings.HasPrefix(load, "socket") && len(data) == 1:
		return fmt.Sprint(data[0])
	}
	return fmt.Sprintf("%x", data)
}

func immValue(d []byte) string {
	switch len(d) {
	case 2:
		return fmt.Sprint(binary.BigEndian.Uint16(d))
	case 4:
		return fmt.Sprintf("%#x", nativeEndian.Uint32(d))
	}
	return fmt.Sprintf("%x", d)
}

func verdictName(v *expr.Verdict) string {
	switch v.Kind {
	case expr.VerdictReturn:
		return "return"
	case expr.VerdictAccept:
		return "accept"
	case expr.VerdictDrop:
		return "drop"
	case expr.VerdictJump:
		return "jump " + v.Chain
	case expr.VerdictGoto:
		return "goto " + v.Chain
	}
	return fmt.Sprintf("verdict %d", v.Kind)
}
