// Package fdlimit sizes connection limits from the process's file
// descriptor limit, as Envoy and HAProxy do: at start the soft
// RLIMIT_NOFILE is raised to the hard one, and the default connection cap
// leaves headroom for the sockets and files a process needs besides its
// clients (admin, health and metrics listeners and their clients, upstream
// connections, watched files, the CA client).
package fdlimit

import (
	"fmt"
	"syscall"
)

// Headroom is the file descriptors kept back from the connection cap.
const Headroom = 256

// Raise lifts the soft RLIMIT_NOFILE to the hard limit and returns the
// soft limit now in force.
func Raise() (uint64, error) {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return 0, fmt.Errorf("get RLIMIT_NOFILE: %w", err)
	}
	if lim.Cur < lim.Max {
		raised := lim
		raised.Cur = lim.Max
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &raised); err != nil {
			return lim.Cur, fmt.Errorf("raise RLIMIT_NOFILE from %d to %d: %w", lim.Cur, lim.Max, err)
		}
		lim = raised
	}
	return lim.Cur, nil
}

// MaxConnections is the default connection cap for a soft limit of nofile
// descriptors when each connection holds perConn of them (2 for a proxied
// connection: the client's and the upstream one): what is left after
// Headroom, at least 1.
func MaxConnections(nofile uint64, perConn int) int {
	if perConn < 1 {
		perConn = 1
	}
	if nofile <= Headroom+uint64(perConn) {
		return 1
	}
	return int(min((nofile-Headroom)/uint64(perConn), 1<<30))
}
