package fdlimit

import (
	"syscall"
	"testing"
)

func TestRaiseLiftsTheSoftLimitToTheHardOne(t *testing.T) {
	var before syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &before); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = syscall.Setrlimit(syscall.RLIMIT_NOFILE, &before) })
	if before.Max > 64 {
		low := syscall.Rlimit{Cur: 64, Max: before.Max}
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &low); err != nil {
			t.Fatal(err)
		}
	}
	got, err := Raise()
	if err != nil {
		t.Fatal(err)
	}
	var after syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &after); err != nil {
		t.Fatal(err)
	}
	if got != before.Max || after.Cur != before.Max {
		t.Fatalf("Raise = %d, soft limit now %d; want the hard limit %d", got, after.Cur, before.Max)
	}
}

func TestMaxConnectionsLeavesHeadroom(t *testing.T) {
	for _, tc := range []struct {
		nofile  uint64
		perConn int
		want    int
	}{
		{20000, 2, (20000 - Headroom) / 2},
		{20000, 1, 20000 - Headroom},
		{1024, 2, (1024 - Headroom) / 2},
		{100, 2, 1},
		{0, 0, 1},
	} {
		if got := MaxConnections(tc.nofile, tc.perConn); got != tc.want {
			t.Errorf("MaxConnections(%d, %d) = %d, want %d", tc.nofile, tc.perConn, got, tc.want)
		}
	}
}
