package inject

import (
	"fmt"

	"github.com/meshproxy/meshproxy/internal/podcapture"
)

// Capture says who installs the pod's traffic capture.
type Capture string

// Where capture is installed.
const (
	// CaptureInit: the pod's own init container (meshproxy-init, with
	// NET_ADMIN and NET_RAW) runs `meshproxy redirect install`.
	CaptureInit Capture = "init"
	// CaptureNode: meshproxy's CNI plugin installs it from the node during
	// sandbox creation; the pod carries no capability, only a validation
	// init container, and meets the restricted Pod Security Standard.
	CaptureNode Capture = "node"
)

// ParseCapture checks a --capture value.
func ParseCapture(s string) (Capture, error) {
	switch c := Capture(s); c {
	case CaptureInit, CaptureNode:
		return c, nil
	}
	return "", fmt.Errorf("capture %q: want init or node", s)
}

// WithCapture chooses who installs capture (default CaptureInit).
func WithCapture(c Capture) Option {
	return func(cfg *config) error {
		if _, err := ParseCapture(string(c)); err != nil {
			return err
		}
		cfg.capture = c
		return nil
	}
}

// checkCapture refuses options that contradict node capture.
func (c *config) checkCapture() error {
	if c.capture != CaptureNode {
		return nil
	}
	if c.ebpfCgroupSet {
		return fmt.Errorf("ebpf cgroup %q given with node capture (the node finds the pod's cgroup itself)", c.ebpfCgroup)
	}
	for _, p := range c.excludeOutboundCIDRs {
		if p.Contains(podcapture.Sentinel.Addr()) {
			return fmt.Errorf("exclude outbound cidrs: %s contains %s, where the validation container checks that capture is in place", p, podcapture.Sentinel.Addr())
		}
	}
	return nil
}
