package policy

import (
	"fmt"
	"strconv"
)

// peerAuthPolicy is one validated PeerAuthentication.
type peerAuthPolicy struct {
	meta
	selector map[string]string // nil: namespace- or mesh-wide
	mode     Mode
	ports    map[uint16]Mode
	// failClosed: the STRICT stand-in of a rejected document; it wins its
	// level, so a rejection never loosens mTLS.
	failClosed bool
}

func compilePeerAuth(m meta, spec *peerAuthSpec, warn func(field, format string, args ...any)) (*peerAuthPolicy, error) {
	p := &peerAuthPolicy{meta: m, selector: spec.Selector.labels()}
	if err := validateSelector("spec.selector", spec.Selector, warn); err != nil {
		return nil, err
	}
	if spec.Mtls != nil {
		mode, err := ParseMode(spec.Mtls.Mode)
		if err != nil {
			return nil, fieldErrorf("spec.mtls.mode", "%v", err)
		}
		p.mode = mode
	}
	if spec.PortLevelMtls != nil {
		if p.selector == nil {
			return nil, fieldErrorf("spec.portLevelMtls", "mesh- and namespace-wide policies (no selector.matchLabels) cannot have port-level mTLS")
		}
		if len(spec.PortLevelMtls) == 0 {
			return nil, fieldErrorf("spec.portLevelMtls", "must have at least one port when set")
		}
		p.ports = make(map[uint16]Mode, len(spec.PortLevelMtls))
		for _, k := range sortedKeys(spec.PortLevelMtls) {
			path := "spec.portLevelMtls[" + k + "]"
			port, err := strconv.ParseUint(k, 10, 16)
			if err != nil || port == 0 {
				return nil, fieldErrorf(path, "want a port number 1-65535")
			}
			mode, err := ParseMode(spec.PortLevelMtls[k].Mode)
			if err != nil {
				return nil, fieldErrorf(path+".mode", "%v", err)
			}
			p.ports[uint16(port)] = mode
		}
	}
	return p, nil
}

// peerAuthn is the effective PeerAuthentication for one workload.
type peerAuthn struct {
	mode  Mode            // never ModeUnset
	ports map[uint16]Mode // never ModeUnset
	// The policies chosen at each level, "namespace/name" or "".
	mesh, namespace, workload string
}

func (p *peerAuthn) modeFor(port uint16) Mode {
	if m, ok := p.ports[port]; ok {
		return m
	}
	if p.mode == ModeUnset { // a zero Snapshot, not made by a Store
		return ModePermissive
	}
	return p.mode
}

// resolvePeerAuth applies Istio's precedence: mesh (root namespace, no
// selector) → namespace (our namespace, no selector) → workload (our
// namespace, selector matching our labels) → port level of the workload
// policy, each level overriding the one before unless UNSET. At each level
// the oldest policy (then the first by name) wins, after the stand-in of a
// rejected STRICT policy. Selector policies in the
// root namespace are not workload policies and, as in Istio, do not apply.
func resolvePeerAuth(all []*peerAuthPolicy, wl Workload, rootNS string, def Mode) peerAuthn {
	var mesh, ns, workload *peerAuthPolicy
	pick := func(cur **peerAuthPolicy, p *peerAuthPolicy) {
		if *cur == nil || p.failClosed && !(*cur).failClosed || p.failClosed == (*cur).failClosed && p.meta.before((*cur).meta) {
			*cur = p
		}
	}
	for _, p := range all {
		switch {
		case p.selector == nil && p.namespace == rootNS:
			pick(&mesh, p)
		case p.selector == nil && p.namespace == wl.Namespace:
			pick(&ns, p)
		case p.selector != nil && p.namespace == wl.Namespace && p.namespace != rootNS && selects(p.selector, wl.Labels):
			pick(&workload, p)
		}
	}
	out := peerAuthn{mode: def}
	for _, lvl := range []struct {
		p    *peerAuthPolicy
		name *string
	}{{mesh, &out.mesh}, {ns, &out.namespace}, {workload, &out.workload}} {
		if lvl.p == nil {
			continue
		}
		*lvl.name = lvl.p.id()
		if lvl.p.mode != ModeUnset {
			out.mode = lvl.p.mode
		}
	}
	if workload != nil && len(workload.ports) > 0 {
		out.ports = make(map[uint16]Mode, len(workload.ports))
		for port, m := range workload.ports {
			if m == ModeUnset {
				m = out.mode
			}
			out.ports[port] = m
		}
	}
	return out
}

// selects reports whether every label of sel is on the workload.
func selects(sel, labels map[string]string) bool {
	for k, v := range sel {
		if got, ok := labels[k]; !ok || got != v {
			return false
		}
	}
	return true
}

func (p *peerAuthn) view() peerAuthView {
	v := peerAuthView{Mode: p.mode.String(), Mesh: p.mesh, Namespace: p.namespace, Workload: p.workload}
	if len(p.ports) > 0 {
		v.Ports = make(map[string]string, len(p.ports))
		for port, m := range p.ports {
			v.Ports[fmt.Sprint(port)] = m.String()
		}
	}
	return v
}

type peerAuthView struct {
	Mode      string            `json:"mode"`
	Ports     map[string]string `json:"port_modes,omitempty"`
	Mesh      string            `json:"mesh_policy,omitempty"`
	Namespace string            `json:"namespace_policy,omitempty"`
	Workload  string            `json:"workload_policy,omitempty"`
}
