// Package localtcp tunes the TCP sockets between the proxy and the apps of
// its own workload: connections that never leave the host (a pod's
// loopback, or its own address), where congestion control has nothing to
// control.
//
// On a host whose default congestion control is BBR, every TCP socket
// paces: it sends no faster than BBR's estimate of the path allows, and a
// socket that has more to send arms a high-resolution timer for the next
// packet. On loopback that estimate is the sender's own speed, so a
// transfer keeps meeting its pace and arms a timer for nearly every packet
// — on a virtual machine each one costs exits to the hypervisor. Measured
// on such a host (bench/RESULTS.md), it was the largest single cost of a
// bulk transfer after the copies and the cipher. Control gives such
// sockets Reno, which never paces, before they connect or listen (the
// kernel keeps pacing a socket that changes algorithm later); a socket
// whose algorithm does not pace keeps the operator's choice, and so does
// every mesh connection to another host, which this package never sees.
package localtcp

import (
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// Unpaced is the congestion control given to local sockets that would pace:
// Reno, which every unprivileged process may choose (the kernel always
// allows it) and which does not pace.
const Unpaced = "reno"

// Control is a net.Dialer or net.ListenConfig Control function for
// sockets to or from the apps of this workload: a socket whose congestion
// control paces (BBR) gets Unpaced instead; connections accepted by a
// listener inherit the listener's. A socket it cannot tune works as
// before: Control never fails a dial or a listen.
func Control(_, _ string, c syscall.RawConn) error {
	_ = c.Control(func(fd uintptr) { Tune(int(fd)) })
	return nil
}

// Tune gives fd Unpaced if its congestion control paces, and reports the
// algorithm fd has afterwards ("" if it is not a TCP socket). Call it
// before the socket connects or listens.
func Tune(fd int) string {
	cc, err := unix.GetsockoptString(fd, unix.IPPROTO_TCP, unix.TCP_CONGESTION)
	if err != nil {
		return ""
	}
	if !Paces(cc) {
		return cc
	}
	if unix.SetsockoptString(fd, unix.IPPROTO_TCP, unix.TCP_CONGESTION, Unpaced) != nil {
		return cc
	}
	return Unpaced
}

// Paces reports whether congestion control algorithm cc makes the kernel
// pace a socket: BBR, in any version.
func Paces(cc string) bool { return strings.HasPrefix(cc, "bbr") }

// Chain returns a Control function that runs first, then Control; first
// may be nil.
func Chain(first func(network, address string, c syscall.RawConn) error) func(network, address string, c syscall.RawConn) error {
	if first == nil {
		return Control
	}
	return func(network, address string, c syscall.RawConn) error {
		if err := first(network, address, c); err != nil {
			return err
		}
		return Control(network, address, c)
	}
}
