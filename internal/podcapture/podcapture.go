// Package podcapture is the contract between `meshproxy inject --capture
// node`, which writes it into a pod's annotations, and the CNI plugin
// (`meshproxy cni`), which reads it back to install the pod's capture from
// the node. It lives once, below both.
package podcapture

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	"github.com/meshproxy/meshproxy/redirect"
)

// Pod annotations. CaptureAnnotation with the value CaptureNode is what
// makes the CNI plugin act; the others refine what it installs and are
// optional (the defaults are `meshproxy redirect install`'s).
const (
	CaptureAnnotation              = "sidecar.meshproxy.io/capture"
	ModeAnnotation                 = "sidecar.meshproxy.io/capture-mode"
	ProxyUIDAnnotation             = "sidecar.meshproxy.io/proxy-uid"
	ExcludeInboundPortsAnnotation  = "sidecar.meshproxy.io/exclude-inbound-ports"
	ExcludeOutboundCIDRsAnnotation = "sidecar.meshproxy.io/exclude-outbound-cidrs"

	// CaptureNode is CaptureAnnotation's value for capture installed by the
	// node (the CNI plugin); CaptureInit marks capture by the pod's own
	// init container, which the plugin leaves alone.
	CaptureNode = "node"
	CaptureInit = "init"
)

// Sentinel is where the validation init container connects to prove that
// outbound capture is in place: an address of TEST-NET-1 (RFC 5737), never
// routed, so the connection only succeeds when it is redirected to the
// proxy's outbound port inside the pod.
var Sentinel = netip.MustParseAddrPort("192.0.2.1:15002")

// ErrInvalid is wrapped by every annotation error.
var ErrInvalid = errors.New("invalid capture annotation")

// Annotations returns the annotations that ask the node to install cfg.
// Zero fields are left out, so the plugin applies the defaults.
func Annotations(cfg redirect.Config) map[string]string {
	a := map[string]string{CaptureAnnotation: CaptureNode}
	if cfg.Mode != "" {
		a[ModeAnnotation] = string(cfg.Mode)
	}
	if cfg.ProxyUID != 0 {
		a[ProxyUIDAnnotation] = strconv.FormatUint(uint64(cfg.ProxyUID), 10)
	}
	if len(cfg.ExcludeInboundPorts) > 0 {
		s := make([]string, len(cfg.ExcludeInboundPorts))
		for i, p := range cfg.ExcludeInboundPorts {
			s[i] = strconv.Itoa(int(p))
		}
		a[ExcludeInboundPortsAnnotation] = strings.Join(s, ",")
	}
	if len(cfg.ExcludeOutboundCIDRs) > 0 {
		s := make([]string, len(cfg.ExcludeOutboundCIDRs))
		for i, p := range cfg.ExcludeOutboundCIDRs {
			s[i] = p.String()
		}
		a[ExcludeOutboundCIDRsAnnotation] = strings.Join(s, ",")
	}
	return a
}

// Keys lists every annotation this package owns, so injection can take
// them out before writing them anew.
func Keys() []string {
	return []string{CaptureAnnotation, ModeAnnotation, ProxyUIDAnnotation,
		ExcludeInboundPortsAnnotation, ExcludeOutboundCIDRsAnnotation}
}

// FromAnnotations reads a pod's annotations. It reports wanted=false, and
// no error, for a pod that does not ask for node capture. For a pod that
// does, every value is validated; a bad one is an error naming the
// annotation, so the pod fails instead of running with the wrong capture.
// defaultMode applies when the pod names no mode.
func FromAnnotations(a map[string]string, defaultMode redirect.Mode) (cfg redirect.Config, wanted bool, err error) {
	v, ok := a[CaptureAnnotation]
	if !ok || v != CaptureNode {
		if ok && v != CaptureInit {
			return redirect.Config{}, false, fmt.Errorf("%w: %s: %q: want %q or %q", ErrInvalid, CaptureAnnotation, v, CaptureNode, CaptureInit)
		}
		return redirect.Config{}, false, nil
	}
	bad := func(key string, err error) (redirect.Config, bool, error) {
		return redirect.Config{}, true, fmt.Errorf("%w: %s: %q: %w", ErrInvalid, key, a[key], err)
	}
	cfg.Mode = defaultMode
	if m, ok := a[ModeAnnotation]; ok {
		if !slices.Contains(redirect.Modes, redirect.Mode(m)) {
			return bad(ModeAnnotation, errors.New("want nftables, iptables or ebpf"))
		}
		cfg.Mode = redirect.Mode(m)
	}
	if s, ok := a[ProxyUIDAnnotation]; ok {
		n, err := strconv.ParseUint(s, 10, 31)
		if err != nil || n == 0 {
			return bad(ProxyUIDAnnotation, errors.New("want a uid 1-2147483647 (never root)"))
		}
		cfg.ProxyUID, cfg.ProxyGID = uint32(n), uint32(n)
	}
	if s, ok := a[ExcludeInboundPortsAnnotation]; ok {
		if cfg.ExcludeInboundPorts, err = redirect.ParsePorts(s); err != nil {
			return bad(ExcludeInboundPortsAnnotation, err)
		}
	}
	if s, ok := a[ExcludeOutboundCIDRsAnnotation]; ok {
		if cfg.ExcludeOutboundCIDRs, err = redirect.ParseCIDRs(s); err != nil {
			return bad(ExcludeOutboundCIDRsAnnotation, err)
		}
	}
	return cfg, true, nil
}
