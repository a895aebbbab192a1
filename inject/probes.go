//go:build !noinject

package inject

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/meshproxy/meshproxy/proxy/apphealth"
)

// probeFields are a container's probe fields and the kind each becomes on
// the health port.
var probeFields = []struct{ field, kind string }{
	{"livenessProbe", apphealth.Liveness},
	{"readinessProbe", apphealth.Readiness},
	{"startupProbe", apphealth.Startup},
}

// handlerFields are the mutually exclusive handlers of a probe.
var handlerFields = []string{"exec", "httpGet", "tcpSocket", "grpc"}

// originalProbes is the value of OriginalProbesAnnotation: container →
// probe field → the probe as it was written.
type originalProbes map[string]map[string]any

// probes rewrites the probes of the application containers (those of
// lists, named by listFields) to the sidecar's health port, first putting
// back what an earlier injection rewrote. It updates the annotations and
// returns the original probes for the sidecar (empty if none).
func probes(annotations object, lists [][]any, listFields []string, field string) (apphealth.Probers, error) {
	if err := restoreProbes(annotations, lists, listFields, field); err != nil {
		return nil, err
	}
	probers := apphealth.Probers{}
	for _, key := range []string{RewriteProbesAnnotation, istioRewriteProbesAnnotation} {
		if v, _ := annotations[key].(string); strings.EqualFold(v, "false") {
			return probers, nil
		}
	}
	originals := originalProbes{}
	for i, list := range lists {
		for j, item := range list {
			ctr, _ := item.(object)
			at := fmt.Sprintf("%sspec.%s[%d].", field, listFields[i], j)
			if err := rewriteContainer(ctr, at, probers, originals); err != nil {
				return nil, err
			}
		}
	}
	if len(originals) == 0 {
		return probers, nil
	}
	js, err := json.Marshal(originals)
	if err != nil {
		return nil, fmt.Errorf("original probes annotation: %w", err)
	}
	annotations[OriginalProbesAnnotation] = string(js)
	return probers, nil
}

// restoreProbes puts back the original probes of OriginalProbesAnnotation
// wherever a probe is still a rewritten one (a probe changed since is the
// new original), also after a container was renamed, and removes the
// annotation. A rewritten probe without an original is an error: the
// sidecar would have nothing to run for it.
func restoreProbes(annotations object, lists [][]any, listFields []string, field string) error {
	orig := originalProbes{}
	if raw, ok := annotations[OriginalProbesAnnotation]; ok {
		s, _ := raw.(string)
		dec := json.NewDecoder(strings.NewReader(s))
		dec.UseNumber()
		if err := dec.Decode(&orig); err != nil {
			return &fieldError{field: field + "metadata.annotations[" + OriginalProbesAnnotation + "]", err: fmt.Errorf("not meshproxy's original probes JSON: %w", err)}
		}
	}
	for i, list := range lists {
		for j, item := range list {
			ctr, _ := item.(object)
			for _, pf := range probeFields {
				cur, ok := ctr[pf.field].(object)
				if !ok {
					continue
				}
				from, ok := rewrittenFor(cur, pf.kind)
				if !ok {
					continue
				}
				o, ok := orig[from][pf.field].(object)
				if !ok {
					return &fieldError{field: fmt.Sprintf("%sspec.%s[%d].%s", field, listFields[i], j, pf.field),
						err: fmt.Errorf("probes the sidecar's %s, but annotation %s has no original probe for it; put the application's own probe back", apphealth.Path(from, pf.kind), OriginalProbesAnnotation)}
				}
				ctr[pf.field] = o
			}
		}
	}
	delete(annotations, OriginalProbesAnnotation)
	return nil
}

// rewrittenFor returns the container whose probe of kind an injection
// rewrote into probe (an httpGet of /app-health/CONTAINER/KIND on the
// health port), if it is one.
func rewrittenFor(probe object, kind string) (string, bool) {
	var p corev1.Probe
	if err := fromGeneric(probe, &p); err != nil || p.HTTPGet == nil || p.HTTPGet.Port.IntValue() != HealthPort {
		return "", false
	}
	rest, ok := strings.CutPrefix(p.HTTPGet.Path, apphealth.PathPrefix)
	container, k, ok2 := strings.Cut(rest, "/")
	if !ok || !ok2 || k != kind || container == "" {
		return "", false
	}
	return container, true
}

// rewriteContainer rewrites ctr's httpGet, tcpSocket and grpc probes that
// reach the container through the pod's address. at is ctr's path.
func rewriteContainer(ctr object, at string, probers apphealth.Probers, originals originalProbes) error {
	var typed corev1.Container
	if err := fromGeneric(ctr, &typed); err != nil {
		return &fieldError{field: strings.TrimSuffix(at, "."), err: err}
	}
	for _, pf := range probeFields {
		raw, ok := ctr[pf.field].(object)
		if !ok {
			continue
		}
		var p corev1.Probe
		if err := fromGeneric(raw, &p); err != nil {
			return &fieldError{field: at + pf.field, err: err}
		}
		pr, ok, err := prober(&p, typed.Ports)
		if err != nil {
			return &fieldError{field: strings.TrimSuffix(at+pf.field+"."+err.field, "."), err: err.err}
		}
		if !ok {
			continue
		}
		path := apphealth.Path(typed.Name, pf.kind)
		rewritten := make(object, len(raw))
		for k, v := range raw {
			rewritten[k] = v
		}
		for _, h := range handlerFields {
			delete(rewritten, h)
		}
		get, err2 := toGeneric(corev1.HTTPGetAction{Path: path, Port: intstr.FromInt32(HealthPort), Scheme: corev1.URISchemeHTTP})
		if err2 != nil {
			return err2
		}
		rewritten["httpGet"] = get
		ctr[pf.field] = rewritten
		probers[path] = pr
		if originals[typed.Name] == nil {
			originals[typed.Name] = map[string]any{}
		}
		originals[typed.Name][pf.field] = raw
	}
	return nil
}

// probeError names the field of a probe at fault, relative to the probe.
type probeError struct {
	field string
	err   error
}

// prober is the sidecar's form of p, and whether p is rewritten at all:
// exec probes run in the container and are left alone, as are probes with
// a host of their own (the kubelet reaches another address, which this
// pod's capture never sees) and probes already on the health port.
func prober(p *corev1.Probe, ports []corev1.ContainerPort) (apphealth.Prober, bool, *probeError) {
	pr := apphealth.Prober{TimeoutSeconds: p.TimeoutSeconds}
	switch {
	case p.HTTPGet != nil:
		port, ok, err := localPort("httpGet", p.HTTPGet.Host, p.HTTPGet.Port, ports)
		if !ok {
			return pr, false, err
		}
		g := &apphealth.HTTPGet{Path: p.HTTPGet.Path, Port: port, Scheme: string(p.HTTPGet.Scheme)}
		for _, h := range p.HTTPGet.HTTPHeaders {
			g.HTTPHeaders = append(g.HTTPHeaders, apphealth.HTTPHeader{Name: h.Name, Value: h.Value})
		}
		pr.HTTPGet = g
	case p.TCPSocket != nil:
		port, ok, err := localPort("tcpSocket", p.TCPSocket.Host, p.TCPSocket.Port, ports)
		if !ok {
			return pr, false, err
		}
		pr.TCPSocket = &apphealth.TCPSocket{Port: port}
	case p.GRPC != nil:
		if p.GRPC.Port == HealthPort {
			return pr, false, nil
		}
		pr.GRPC = &apphealth.GRPC{Port: p.GRPC.Port, Service: p.GRPC.Service}
	default:
		return pr, false, nil
	}
	// What the sidecar would refuse at start-up is refused here, naming the probe.
	if err := pr.Check(); err != nil {
		return pr, false, &probeError{"", err}
	}
	return pr, true, nil
}

// localPort is the port of an httpGet or tcpSocket probe (field), and
// whether the probe is rewritten: not when it has a host of its own or is
// on the health port already.
func localPort(field, host string, port intstr.IntOrString, ports []corev1.ContainerPort) (int32, bool, *probeError) {
	if host != "" {
		return 0, false, nil
	}
	n, err := resolvePort(port, ports)
	if err != nil {
		return 0, false, &probeError{field + ".port", err}
	}
	return n, n != HealthPort, nil
}

// resolvePort turns a probe port (number or container port name) into a number.
func resolvePort(port intstr.IntOrString, ports []corev1.ContainerPort) (int32, error) {
	if port.Type == intstr.Int {
		if port.IntVal < 1 || port.IntVal > 65535 {
			return 0, fmt.Errorf("port %d: want 1-65535", port.IntVal)
		}
		return port.IntVal, nil
	}
	for _, p := range ports {
		if p.Name == port.StrVal {
			return p.ContainerPort, nil
		}
	}
	return 0, fmt.Errorf("named port %q is not among the container's ports", port.StrVal)
}

// fromGeneric decodes a generic object into a typed value.
func fromGeneric(o object, v any) error {
	b, err := json.Marshal(o)
	if err != nil {
		return fmt.Errorf("encode: %w", err)
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	return dec.Decode(v)
}
