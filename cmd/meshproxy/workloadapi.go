package main

import (
	"context"

	"github.com/meshproxy/meshproxy/internal/serve"
	"github.com/meshproxy/meshproxy/tlsmgr"
)

// newWorkloadAPISource connects the sidecar to a SPIFFE Workload API (a
// SPIRE agent); the source starts watching when its Run is called.
func newWorkloadAPISource(ctx context.Context, addr string, opts []tlsmgr.Option) (serve.Source, error) {
	src, err := tlsmgr.NewWorkloadAPISource(ctx, addr, opts...)
	if err != nil {
		return nil, usagef("--workload-api %q: %v", addr, err)
	}
	return src, nil
}
