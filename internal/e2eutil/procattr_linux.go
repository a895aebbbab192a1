package e2eutil

import "syscall"

// sysProcAttr has the kernel kill the child if the test binary dies, so a
// crashed or timed-out test leaves no sidecar behind.
func sysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
