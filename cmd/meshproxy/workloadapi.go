package main

import (
	"context"
	"errors"

	"github.com/meshproxy/meshproxy/tlsmgr"
)

// PLACEHOLDER until tlsmgr.NewWorkloadAPISource lands.
func newWorkloadAPISource(context.Context, string, []tlsmgr.Option) (runnable, error) {
	return nil, errors.New("--workload-api: not built yet")
}
