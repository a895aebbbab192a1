package ports

import (
	"net"
	"slices"
	"testing"
)

func TestAddressesParse(t *testing.T) {
	for _, a := range []string{Any(Metrics), Loopback(Admin)} {
		if _, port, err := net.SplitHostPort(a); err != nil || port == "" {
			t.Errorf("%q is not HOST:PORT: %v", a, err)
		}
	}
	if got := Loopback(Admin); got != "127.0.0.1:15000" {
		t.Errorf("Loopback(Admin) = %q", got)
	}
	if got := Any(Inbound); got != ":15006" {
		t.Errorf("Any(Inbound) = %q", got)
	}
}

func TestProxyPortsExemptCaptureAndEndpoints(t *testing.T) {
	p := Proxy()
	for _, want := range []uint16{Admin, Outbound, Inbound, HBONE, Metrics, Health} {
		if !slices.Contains(p, want) {
			t.Errorf("Proxy() lacks %d", want)
		}
	}
	if slices.Contains(p, CA) {
		t.Error("Proxy() holds the CA port, which is not the sidecar's")
	}
	p[0] = 1
	if Proxy()[0] == 1 {
		t.Error("Proxy() returns shared storage")
	}
}
