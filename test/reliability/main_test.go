package reliability

import (
	"testing"

	"github.com/meshproxy/meshproxy/internal/e2eutil"
)

// binary is the meshproxy binary built once for all tests.
var binary string

func TestMain(m *testing.M) { e2eutil.Main(m, "reliability", &binary) }
