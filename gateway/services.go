package gateway

import (
	"encoding/json"
	"strings"

	"github.com/meshproxy/meshproxy/internal/manifest"
)

// servicePorts holds the ports of the Kubernetes Services found among the
// gateway's configuration files (the same files `kubectl apply` takes, which
// often carry a Service beside its VirtualService), by "name.namespace". A
// VirtualService destination without a port uses the port of its Service
// when that Service has exactly one, as Istio does.
type servicePorts map[string][]uint16

// serviceDoc is the part of a core/v1 Service the gateway reads; the rest
// is not its business, so it is decoded leniently and never rejected.
type serviceDoc struct {
	Metadata struct {
		Name      string `json:"name"`
		Namespace string `json:"namespace"`
	} `json:"metadata"`
	Spec struct {
		Ports []struct {
			Port int `json:"port"`
		} `json:"ports"`
	} `json:"spec"`
}

// addService records the ports of d, a core/v1 Service, with defaultNS for
// a Service without a namespace; a document that does not read as one is
// skipped.
func (s servicePorts) addService(d manifest.Doc, defaultNS string) {
	var svc serviceDoc
	if json.Unmarshal(d.JSON, &svc) != nil || svc.Metadata.Name == "" {
		return
	}
	ns := svc.Metadata.Namespace
	if ns == "" {
		ns = defaultNS
	}
	var ports []uint16
	for _, p := range svc.Spec.Ports {
		if p.Port > 0 && p.Port <= 65535 {
			ports = append(ports, uint16(p.Port))
		}
	}
	s[svc.Metadata.Name+"."+ns] = ports
}

// lookup returns the ports of the Service a destination host names:
// "name.namespace", optionally followed by ".svc" and the cluster domain.
func (s servicePorts) lookup(host string) ([]uint16, bool) {
	name, ns, ok := strings.Cut(host, ".")
	if !ok {
		return nil, false
	}
	if i := strings.Index(ns, "."); i >= 0 {
		if rest := ns[i:]; rest != ".svc" && !strings.HasPrefix(rest, ".svc.") {
			return nil, false
		}
		ns = ns[:i]
	}
	ports, ok := s[name+"."+ns]
	return ports, ok
}
