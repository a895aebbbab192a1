package main

import (
	"context"

	"github.com/meshproxy/meshproxy/tlsmgr"
)

// newWorkloadAPISource connects the sidecar to a SPIFFE Workload API (a
// SPIRE agent); the source starts watching when its Run is called.
func newWorkloadAPISource(ctx context.Context, addr string, opts []tlsmgr.Option) (runnable, error) {
	src, err := tlsmgr.NewWorkloadAPISource(ctx, addr, opts...)
	if err != nil {
		return nil, usagef("--workload-api %q: %v", addr, err)
	}
	return src, nil
}
