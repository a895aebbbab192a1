package ca

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the package if a test leaves goroutines behind: Serve and
// ServeMetrics must stop everything they started.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
