package policy

import (
	"cmp"
	"encoding/json"
	"strings"

	"github.com/meshproxy/meshproxy/internal/manifest"
)

// A rejected document is not applied, but where dropping it could open
// traffic it is replaced by a stand-in that fails closed for what it
// selects. What it selects is read loosely (any field that still makes
// sense), since the document as a whole did not decode.

// looseObject is a document decoded without a schema.
type looseObject map[string]any

func loose(raw []byte) looseObject {
	var o looseObject
	_ = json.Unmarshal(raw, &o) // not an object: every lookup below finds nothing
	return o
}

// get walks a path of mapping keys.
func (o looseObject) get(path ...string) any {
	var cur any = map[string]any(o)
	for _, k := range path {
		m, ok := cur.(map[string]any)
		if !ok {
			return nil
		}
		cur = m[k]
	}
	return cur
}

func (o looseObject) str(path ...string) (string, bool) {
	s, ok := o.get(path...).(string)
	return s, ok
}

// labels reads a matchLabels mapping; ok is false when it is absent or not
// a mapping of strings (then a stand-in selects the whole namespace, the
// wider and so safer choice).
func (o looseObject) labels(path ...string) (map[string]string, bool) {
	m, ok := o.get(path...).(map[string]any)
	if !ok || len(m) == 0 {
		return nil, false
	}
	out := make(map[string]string, len(m))
	for k, v := range m {
		s, ok := v.(string)
		if !ok {
			return nil, false
		}
		out[k] = s
	}
	return out, true
}

// looseName returns metadata.namespace and metadata.name if they are strings.
func looseName(raw []byte) (namespace, name string) {
	o := loose(raw)
	namespace, _ = o.str("metadata", "namespace")
	name, _ = o.str("metadata", "name")
	return namespace, name
}

// looseAnnotation returns one annotation's value.
func looseAnnotation(raw []byte, key string) (string, bool) {
	return loose(raw).str("metadata", "annotations", key)
}

func (l *loader) standInMeta(doc *Document) meta {
	return meta{kind: doc.Kind, namespace: cmp.Or(doc.Namespace, l.wlNamespace), name: cmp.Or(doc.Name, "(unnamed)")}
}

// failAuthz stands in for a rejected AuthorizationPolicy: a DENY (or
// CUSTOM, or unreadable action) denies everything it selects; an ALLOW
// allows nothing (so the workload allows only what other ALLOW policies
// do). Dry-run and AUDIT policies decide nothing, so they need no stand-in.
func (l *loader) failAuthz(d manifest.Doc, doc *Document) {
	o := loose(d.JSON)
	if v, ok := o.str("metadata", "annotations", "istio.io/dry-run"); ok && strings.EqualFold(v, "true") {
		doc.warn("", "dry-run policy: never enforced, so nothing fails closed")
		return
	}
	if o.get("spec", "targetRef") != nil || o.get("spec", "targetRefs") != nil {
		if _, ok := o.labels("spec", "selector", "matchLabels"); !ok {
			doc.warn("", "attached by targetRefs to a gateway or waypoint, not to sidecars: nothing fails closed here")
			return
		}
	}
	p := &authzPolicy{meta: l.standInMeta(doc), action: actionDeny, failClosed: "rejected"}
	p.selector, _ = o.labels("spec", "selector", "matchLabels")
	action, _ := o.str("spec", "action")
	switch strings.ToUpper(action) {
	case "AUDIT":
		doc.warn("", "AUDIT decides nothing, so nothing fails closed")
		return
	case "", "ALLOW":
		p.action = actionAllow
		doc.warn("", "fails closed: applied as an ALLOW policy that allows nothing, for the workloads it selects")
	default:
		p.rules = []authzRuleMatch{{}} // matches every connection
		doc.warn("", "fails closed: the workloads it selects deny every connection")
	}
	l.cfg.set.authz = append(l.cfg.set.authz, p)
}

// failPeerAuth stands in for a rejected PeerAuthentication: one whose mode
// is STRICT, or cannot be read, keeps STRICT for what it selects; one that
// asks for less needs no stand-in (what it would have loosened stays).
func (l *loader) failPeerAuth(d manifest.Doc, doc *Document) {
	o := loose(d.JSON)
	mode, _ := o.str("spec", "mtls", "mode")
	if m, err := ParseMode(mode); err == nil && m != ModeStrict {
		return
	}
	p := &peerAuthPolicy{meta: l.standInMeta(doc), mode: ModeStrict, failClosed: true}
	p.selector, _ = o.labels("spec", "selector", "matchLabels")
	doc.warn("", "fails closed: STRICT mTLS for the workloads it selects")
	l.cfg.set.peerAuths = append(l.cfg.set.peerAuths, p)
}

// failDestRule stands in for a rejected DestinationRule whose host can be
// read: ISTIO_MUTUAL keeps mesh mTLS to the host (any SPIFFE ID of the
// trust domain); SIMPLE or MUTUAL (TLS origination) refuses connections to
// it, since sending them in plaintext would expose what the rule protects.
func (l *loader) failDestRule(d manifest.Doc, doc *Document) {
	o := loose(d.JSON)
	host, _ := o.str("spec", "host")
	mode, _ := o.str("spec", "trafficPolicy", "tls", "mode")
	t := &tlsSetting{}
	switch strings.ToUpper(mode) {
	case "ISTIO_MUTUAL":
		t.mtls = true
	case "SIMPLE", "MUTUAL":
		t.refuse = true
	default:
		return
	}
	dr := &destRule{meta: l.standInMeta(doc), host: host, tls: t}
	if err := dr.parseHost(host); err != nil {
		doc.warn("spec.host", "cannot be read, so nothing fails closed for it: %v", err)
		return
	}
	if t.mtls {
		doc.warn("", "fails closed: connections to %s keep mesh mTLS", host)
	} else {
		doc.warn("", "fails closed: connections to %s are refused (no TLS origination, no plaintext)", host)
	}
	l.cfg.set.dests = append(l.cfg.set.dests, dr)
}
