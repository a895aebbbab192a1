package cni

import (
	"errors"
	"fmt"
	"os"
	"runtime"

	"github.com/vishvananda/netns"
)

// errNoNetns means the pod's network namespace no longer exists.
var errNoNetns = errors.New("network namespace is gone")

// inNetns runs f on an OS thread that has entered the network namespace at
// path. The thread is never handed back to the Go scheduler: it ends with
// its goroutine, so no other goroutine runs in the pod's namespace.
// Processes f starts (iptables-restore) inherit the namespace.
func inNetns(path string, f func() error) error {
	if path == "" {
		return fmt.Errorf("%w: CNI_NETNS is empty", errNoNetns)
	}
	if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("%w: %s", errNoNetns, path)
	}
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread dies with the goroutine
		h, err := netns.GetFromPath(path)
		if err != nil {
			if errors.Is(err, os.ErrNotExist) {
				err = errNoNetns
			}
			errc <- fmt.Errorf("open network namespace %s: %w", path, err)
			return
		}
		defer h.Close()
		if err := netns.Set(h); err != nil {
			errc <- fmt.Errorf("enter network namespace %s: %w", path, err)
			return
		}
		errc <- f()
	}()
	return <-errc
}
