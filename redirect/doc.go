// Package redirect sets up the kernel so that a pod's TCP traffic reaches the
// sidecar, and answers "where was this connection going?" for the sidecar.
// It only configures the kernel; it never proxies a byte.
//
// Three mechanisms install the capture, chosen by Config.Mode:
//
//   - nftables (default): one table, inet meshproxy, holding a nat output
//     chain (outbound TCP → OutboundPort) and a nat prerouting chain (inbound
//     TCP → InboundPort), or with TProxy a mangle-priority prerouting chain
//     with TPROXY rules plus policy routing (fwmark → a table whose default
//     route is local). Installed in one atomic netlink batch. Every rule
//     carries its own description as comment, which install compares and
//     status prints, and which keeps `nft list ruleset` output reloadable.
//   - iptables: chains of our own (MESHPROXY_INBOUND, MESHPROXY_IN_REDIRECT,
//     MESHPROXY_OUTPUT, MESHPROXY_REDIRECT; with TProxy MESHPROXY_DIVERT and
//     MESHPROXY_TPROXY in mangle) loaded with iptables-restore --noflush and
//     ip6tables-restore on the nft or legacy backend (auto: the backend that
//     already holds rules, as istio-iptables decides), modelled on
//     istio-iptables.
//   - ebpf: cgroup/connect4 and cgroup/connect6 programs on the pod's cgroup
//     rewrite outbound connects to the loopback outbound port and record the
//     original destination by socket cookie; a sockops program re-files the
//     record under the client socket's own address once it is connected, and
//     a cgroup/getsockopt program answers SO_ORIGINAL_DST for the proxy's
//     accepted socket from it; getpeername4/6 show the app its original
//     peer. Programs, links and maps are pinned under
//     /sys/fs/bpf/meshproxy/<cgroup>-<hash>/. Inbound capture uses the
//     nftables prerouting rule. Needs Linux 5.8 or later.
//
// Never captured: the proxy's own traffic (ProxyUID or ProxyGID), loopback
// destinations and traffic to the pod's own addresses (it leaves through lo;
// eBPF mode records the pod's addresses at install), the proxy's ports
// inbound, ExcludeInboundPorts and ExcludeOutboundCIDRs. Unlike Istio, the
// proxy's own connections to the pod's own address are not sent back to the
// inbound port: that needs the inbound forwarder to bind 127.0.0.6, which
// ours does not.
//
// Install is idempotent (it compares with what is live and does nothing when
// it matches), Uninstall removes exactly what Install added, and a failure
// half way rolls back what was already done. Errors wrap ErrInvalidConfig,
// ErrPermission (naming CAP_NET_ADMIN or CAP_BPF) or ErrUnsupported.
//
// OriginalDst recovers the original destination of an accepted connection
// for every mode, and ListenTransparent opens the IP_TRANSPARENT listener
// that TPROXY capture needs.
//
// TPROXY inbound end to end (`redirect install --tproxy` with `run
// --tproxy`): the proxy accepts on a transparent listener and connects to
// the app with DialTransparent, from the client's own address, on a socket
// marked TProxyMark, so the app sees the real client as its peer. The app's
// replies are addressed to that client and would leave the pod; the TProxy
// capture therefore also saves the mark of the proxy's packets in their
// connection (nftables chain upstream_mark, a route chain on output;
// iptables mangle OUTPUT → MESHPROXY_UPSTREAM, CONNMARK --save-mark) and
// restores it on the app's replies (ct mark → meta mark, CONNMARK
// --restore-mark), which the kernel then routes again: the fwmark rule sends
// them to the local table, and so to the proxy's socket. Marked packets are
// never captured outbound (they are the proxy's, uid 1337, and go through
// lo anyway; a rule exempts the mark explicitly too). The sidecar needs
// CAP_NET_ADMIN for IP_TRANSPARENT and SO_MARK: running as uid 1337, as an
// ambient capability (Kubernetes: securityContext.capabilities.add:
// [NET_ADMIN]); without it, `run --tproxy` fails at start naming it.
package redirect
