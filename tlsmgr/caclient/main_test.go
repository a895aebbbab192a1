package caclient

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the package if a client leaves a connection's goroutines
// behind.
func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }
