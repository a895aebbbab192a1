package podcapture

import (
	"errors"
	"net/netip"
	"reflect"
	"strings"
	"testing"

	"github.com/meshproxy/meshproxy/redirect"
)

// TestRoundTrip: what injection writes, the plugin reads back as the same
// capture.
func TestRoundTrip(t *testing.T) {
	want := redirect.Config{Mode: redirect.ModeEBPF, ProxyUID: 1400, ProxyGID: 1400,
		ExcludeInboundPorts:  []uint16{8443, 9000},
		ExcludeOutboundCIDRs: []netip.Prefix{netip.MustParsePrefix("169.254.169.254/32"), netip.MustParsePrefix("fd00::/8")}}
	got, wanted, err := FromAnnotations(Annotations(want), redirect.ModeNftables)
	if err != nil || !wanted || !reflect.DeepEqual(got, want) {
		t.Fatalf("got %+v %v %v, want %+v", got, wanted, err, want)
	}
	got, wanted, err = FromAnnotations(map[string]string{CaptureAnnotation: CaptureNode}, redirect.ModeIptables)
	if err != nil || !wanted || !reflect.DeepEqual(got, redirect.Config{Mode: redirect.ModeIptables}) {
		t.Fatalf("defaults: got %+v %v %v", got, wanted, err)
	}
}

// TestNotWanted: pods without the annotation, or captured by their own init
// container, are not the node's business.
func TestNotWanted(t *testing.T) {
	for _, a := range []map[string]string{nil, {"x": "y"}, {CaptureAnnotation: CaptureInit, ModeAnnotation: "bogus"}} {
		if _, wanted, err := FromAnnotations(a, redirect.ModeNftables); wanted || err != nil {
			t.Errorf("%v: wanted %v, err %v", a, wanted, err)
		}
	}
}

// TestInvalidValuesNameTheAnnotation: a bad value is an error naming the
// annotation, never a silently different capture.
func TestInvalidValuesNameTheAnnotation(t *testing.T) {
	for key, v := range map[string]string{
		CaptureAnnotation:              "yes",
		ModeAnnotation:                 "ipvs",
		ProxyUIDAnnotation:             "0",
		ExcludeInboundPortsAnnotation:  "80,http",
		ExcludeOutboundCIDRsAnnotation: "10.0.0.0/33",
	} {
		a := map[string]string{CaptureAnnotation: CaptureNode, key: v}
		_, _, err := FromAnnotations(a, redirect.ModeNftables)
		if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), key) {
			t.Errorf("%s=%q: %v", key, v, err)
		}
	}
	if _, _, err := FromAnnotations(map[string]string{CaptureAnnotation: CaptureNode, ProxyUIDAnnotation: "4294967296"}, ""); err == nil {
		t.Error("uid beyond 2^31-1 accepted")
	}
}
