package gateway

import (
	"cmp"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	"github.com/meshproxy/meshproxy/internal/manifest"
	"k8s.io/apimachinery/pkg/util/validation"
)

// maxErrors bounds how many problems one load reports.
const maxErrors = 20

// versions of networking.istio.io read for Gateway and VirtualService.
var versions = []string{"v1", "v1beta1", "v1alpha3"}

// workload is the gateway workload that Gateways select and that
// VirtualServices' exportTo is relative to.
type workload struct {
	namespace string
	labels    map[string]string // nil: Gateway selectors are not checked
}

type gatewayObj = manifest.Object[gatewaySpec]
type serviceObj = manifest.Object[virtualServiceSpec]

// compiler builds a config from documents, collecting errors.
type compiler struct {
	wl    workload
	log   *slog.Logger
	errs  []error
	seen  map[string]string // kind/namespace/name → where first defined
	warns []warning
	// services are the Services among the files, for destinations
	// without a port (services.go).
	services servicePorts
}

// warning is a field of a document that the gateway applies without, or
// ignores: where names the document (as c.where does).
type warning struct {
	where, field, msg string
}

func (c *compiler) warn(where, field, format string, args ...any) {
	w := warning{where: where, field: field, msg: fmt.Sprintf(format, args...)}
	c.warns = append(c.warns, w)
	c.log.Warn("gateway: document applied with a warning", "where", where, "field", field, "reason", w.msg)
}

func (c *compiler) fail(err error) {
	if err != nil {
		c.errs = append(c.errs, err)
	}
}

// loadConfig validates the Gateways and VirtualServices among files as one
// unit: any error fails the whole set. Other kinds are skipped (the policy
// store reads DestinationRule and AuthorizationPolicy from the same files).
func loadConfig(files []manifest.File, wl workload, log *slog.Logger) (*config, error) {
	cfg, _, err := loadConfigWarn(files, wl, log)
	return cfg, err
}

// loadConfigWarn is loadConfig, also returning the warnings. On errors it
// returns them, and (for loadIsolated) the config built without the
// rejected documents.
func loadConfigWarn(files []manifest.File, wl workload, log *slog.Logger) (*config, []warning, error) {
	cfg, warns, err := loadIsolated(files, wl, log)
	if err != nil {
		return nil, warns, err
	}
	return cfg, warns, nil
}

// loadIsolated builds the config of files with every rejected document
// left out (a rejected Gateway binds no server, a rejected VirtualService
// routes nothing: closed), and returns the rejections as err.
func loadIsolated(files []manifest.File, wl workload, log *slog.Logger) (*config, []warning, error) {
	c := &compiler{wl: wl, log: log, seen: map[string]string{}, services: servicePorts{}}
	docs, errs := manifest.Documents(files)
	c.errs = append(c.errs, errs...)
	var gws []*gatewayObj
	var vss []*serviceObj
	for _, d := range docs {
		group, _, kind := d.Kind()
		switch {
		case group == "networking.istio.io" && kind == "Gateway":
			if g := decode[gatewaySpec](c, d); g != nil {
				gws = append(gws, g)
			}
		case group == "networking.istio.io" && kind == "VirtualService":
			if v := decode[virtualServiceSpec](c, d); v != nil {
				vss = append(vss, v)
			}
		case group == "" && kind == "Service":
			c.services.addService(d, wl.namespace)
		}
	}
	cfg := c.build(gws, vss)
	if len(c.errs) > 0 {
		if len(c.errs) > maxErrors {
			c.errs = append(c.errs[:maxErrors], fmt.Errorf("… and %d more errors", len(c.errs)-maxErrors))
		}
		return cfg, c.warns, errors.Join(c.errs...)
	}
	return cfg, c.warns, nil
}

func decode[S any](c *compiler, d manifest.Doc) *manifest.Object[S] {
	obj, err := manifest.DecodeObject[S](d, versions, c.wl.namespace)
	if err != nil {
		c.fail(err)
		return nil
	}
	key := obj.Kind + "/" + obj.ID()
	if first, dup := c.seen[key]; dup {
		c.fail(fmt.Errorf("%s: %s %s is defined twice (first in %s)", d.Where, obj.Kind, obj.ID(), first))
		return nil
	}
	c.seen[key] = d.Where
	return obj
}

// where names the file and document an object came from, with its kind
// and namespace/name.
func (c *compiler) where(kind, id string) string {
	return fmt.Sprintf("%s (%s %s)", c.seen[kind+"/"+id], kind, id)
}

// older orders objects as Istio breaks ties: oldest creationTimestamp
// first, then by namespace/name.
func older[S any](a, b *manifest.Object[S]) int {
	if c := a.Metadata.CreationTimestamp.Compare(b.Metadata.CreationTimestamp.Time); c != 0 {
		return c
	}
	return cmp.Compare(a.ID(), b.ID())
}

// vsCompiled is a validated VirtualService.
type vsCompiled struct {
	id       string
	ns       string
	hosts    []host
	gateways []string // namespace/name; "mesh" dropped
	exportTo []string
	http     bool
	tls      []*routeSpecCompiled
	tcp      []*routeSpecCompiled
}

// routeSpecCompiled is a route before it is bound to servers: each match
// keeps the Gateways it is limited to.
type routeSpecCompiled struct {
	index   int
	matches []matchCompiled
	dests   []destination
	weights int
}

type matchCompiled struct {
	routeMatch
	gateways []string // namespace/name; empty: any of the service's
}

func (c *compiler) build(gws []*gatewayObj, vss []*serviceObj) *config {
	slices.SortFunc(gws, older)
	slices.SortFunc(vss, older)
	cfg := &config{ports: map[uint16]*portConfig{}, credentials: map[string]bool{}}
	ours := map[string]bool{}
	for _, g := range gws {
		if c.wl.labels != nil && !selects(g.Spec.Selector, c.wl.labels) {
			c.log.Debug("gateway: Gateway does not select this workload", "gateway", g.ID(), "selector", g.Spec.Selector)
			continue
		}
		ours[g.ID()] = true
		where := c.where("Gateway", g.ID())
		servers, err := compileGateway(g, func(field, format string, args ...any) { c.warn(where, field, format, args...) })
		if err != nil {
			c.fail(fmt.Errorf("%s: %w", where, err))
			continue
		}
		for _, s := range servers {
			c.addServer(cfg, s)
		}
	}
	var services []*vsCompiled
	for _, v := range vss {
		where := c.where("VirtualService", v.ID())
		// As Istio's gateway does, a VirtualService not bound to one of this
		// gateway's Gateways is not its business: ignored, not validated.
		if !bindsTo(v, ours) {
			c.warn(where, "spec.gateways", "not bound to a Gateway of this gateway; ignored")
			continue
		}
		vs, err := compileService(v, c.services, func(field, format string, args ...any) { c.warn(where, field, format, args...) })
		if err != nil {
			c.fail(fmt.Errorf("%s: %w", where, err))
			continue
		}
		if vs.http {
			c.warn(where, "spec.http", "HTTP routes are L7 and not used by the gateway (it routes TLS by SNI and TCP by port); nothing is routed by them")
		}
		services = append(services, vs)
	}
	for _, pc := range cfg.ports {
		for _, s := range pc.servers {
			s.routes = c.bind(s, pc.port, services)
		}
	}
	return cfg
}

// bindsTo reports whether v names one of ours in spec.gateways or in a
// route match's gateways (names as written; a short name is in v's
// namespace).
func bindsTo(v *serviceObj, ours map[string]bool) bool {
	refs := slices.Clone(v.Spec.Gateways)
	for _, r := range v.Spec.TLS {
		for _, m := range r.Match {
			refs = append(refs, m.Gateways...)
		}
	}
	for _, r := range v.Spec.TCP {
		for _, m := range r.Match {
			refs = append(refs, m.Gateways...)
		}
	}
	for _, ref := range refs {
		if !strings.Contains(ref, "/") {
			ref = v.Metadata.Namespace + "/" + ref
		}
		if ours[ref] {
			return true
		}
	}
	return false
}

// addServer puts s on its port, refusing a port that mixes TCP and TLS or a
// host served twice on one port.
func (c *compiler) addServer(cfg *config, s *server) {
	port := s.portNum
	pc := cfg.ports[port]
	if pc == nil {
		pc = &portConfig{port: port, label: strconv.Itoa(int(port)), tcp: s.mode == modeTCP}
		cfg.ports[port] = pc
	}
	where := fmt.Sprintf("%s: spec.servers[%d]", c.where("Gateway", s.gateway), s.index)
	if pc.tcp != (s.mode == modeTCP) {
		other := pc.servers[0]
		c.fail(fmt.Errorf("%s: port %d is TCP on one server and TLS on another (Gateway %s spec.servers[%d]); a port carries one or the other",
			where, port, other.gateway, other.index))
		return
	}
	if !pc.tcp {
		for _, o := range pc.servers {
			for _, h := range s.hosts {
				if slices.ContainsFunc(o.hosts, func(x serverHost) bool { return x.host == h.host }) {
					c.fail(fmt.Errorf("%s: host %q on port %d is already served by Gateway %s spec.servers[%d]",
						where, h.host, port, o.gateway, o.index))
					return
				}
			}
		}
	}
	pc.servers = append(pc.servers, s)
	if s.credential != "" {
		cfg.credentials[s.credential] = cfg.credentials[s.credential] || s.mode == modeMutual
	}
}

// bind collects, in order, the routes of the VirtualServices bound to s.
func (c *compiler) bind(s *server, port uint16, services []*vsCompiled) []*route {
	var out []*route
	for _, vs := range services {
		if !slices.Contains(vs.gateways, s.gateway) || !vs.visibleTo(c.wl.namespace) || !s.admits(vs) {
			continue
		}
		specs, kind := vs.tcp, "tcp"
		if s.mode == modePassthrough {
			specs, kind = vs.tls, "tls"
		}
		var scope []host
		if s.mode != modeTCP {
			for _, sh := range s.hosts {
				if sh.ns == "*" || sh.ns == vs.ns {
					scope = append(scope, sh.host)
				}
			}
		}
		for _, rs := range specs {
			r := &route{name: vs.id, kind: kind, index: rs.index, dests: rs.dests, weights: rs.weights, scope: scope}
			applies := len(rs.matches) == 0
			for _, m := range rs.matches {
				if len(m.gateways) > 0 && !slices.Contains(m.gateways, s.gateway) {
					continue
				}
				if m.port != 0 && m.port != port {
					continue
				}
				r.matches = append(r.matches, m.routeMatch)
				applies = true
			}
			if applies {
				out = append(out, r)
			}
		}
	}
	return out
}

// admits reports whether a VirtualService may bind to s: some host of the
// service intersects a server host whose namespace part admits it.
func (s *server) admits(vs *vsCompiled) bool {
	for _, sh := range s.hosts {
		if sh.ns != "*" && sh.ns != vs.ns {
			continue
		}
		for _, h := range vs.hosts {
			if sh.host.intersects(h) {
				return true
			}
		}
	}
	return false
}

func (vs *vsCompiled) visibleTo(ns string) bool {
	if len(vs.exportTo) == 0 {
		return true
	}
	for _, e := range vs.exportTo {
		if e == "*" || e == ns || (e == "." && vs.ns == ns) {
			return true
		}
	}
	return false
}

func selects(sel, labels map[string]string) bool {
	for k, v := range sel {
		if got, ok := labels[k]; !ok || got != v {
			return false
		}
	}
	return true
}

// compileGateway validates a Gateway's servers. A server the gateway does
// not serve at L4 (HTTP, ISTIO_MUTUAL, AUTO_PASSTHROUGH) is not bound, with
// a warning: nothing is routed that was not asked for.
func compileGateway(g *gatewayObj, warn func(field, format string, args ...any)) ([]*server, error) {
	if len(g.Spec.Servers) == 0 {
		return nil, manifest.Errorf("spec.servers", "required: at least one server")
	}
	if errs := validation.IsDNS1123Label(g.Metadata.Name); len(errs) > 0 {
		return nil, manifest.Errorf("metadata.name", "%q: a Gateway's name is a DNS label (no dots): %s", g.Metadata.Name, strings.Join(errs, "; "))
	}
	names := map[string]bool{}
	for i, ss := range g.Spec.Servers {
		if ss.Port == nil {
			continue // compileServer says why
		}
		if names[ss.Port.Name] {
			return nil, manifest.Errorf(fmt.Sprintf("spec.servers[%d].port.name", i), "%q: port names must be unique among the servers", ss.Port.Name)
		}
		names[ss.Port.Name] = true
	}
	for k, v := range g.Spec.Selector {
		if errs := validation.IsQualifiedName(k); len(errs) > 0 {
			return nil, manifest.Errorf("spec.selector", "label key %q: %s", k, strings.Join(errs, "; "))
		}
		if errs := validation.IsValidLabelValue(v); len(errs) > 0 {
			return nil, manifest.Errorf("spec.selector["+k+"]", "label value %q: %s", v, strings.Join(errs, "; "))
		}
	}
	var out []*server
	for i, ss := range g.Spec.Servers {
		s, err := compileServer(g, i, &ss, warn)
		var nb notBound
		if errors.As(err, &nb) {
			warn(fmt.Sprintf("spec.servers[%d]", i), "not bound: %s", nb.why)
			continue
		}
		if err != nil {
			return nil, err
		}
		out = append(out, s)
	}
	return out, nil
}

// notBound is a valid server the gateway does not serve.
type notBound struct{ why string }

func (e notBound) Error() string { return "not bound: " + e.why }

func compileServer(g *gatewayObj, i int, ss *serverSpec, warn func(field, format string, args ...any)) (*server, error) {
	path := fmt.Sprintf("spec.servers[%d]", i)
	s := &server{gateway: g.ID(), index: i, name: ss.Name}
	if ss.Port == nil {
		return nil, manifest.Errorf(path+".port", "required")
	}
	if ss.Port.Number == 0 || ss.Port.Number > 65535 {
		return nil, manifest.Errorf(path+".port.number", "want a port number 1-65535, got %d", ss.Port.Number)
	}
	s.portNum = uint16(ss.Port.Number)
	if ss.Port.Name == "" {
		return nil, manifest.Errorf(path+".port.name", "required")
	}
	if s.name == "" {
		s.name = ss.Port.Name
	}
	s.protocol = strings.ToUpper(ss.Port.Protocol)
	switch s.protocol {
	case "TCP":
		if ss.TLS != nil {
			return nil, manifest.Errorf(path+".tls", "a TCP server takes no tls settings; use protocol TLS to terminate or pass TLS through")
		}
		s.mode = modeTCP
	case "TLS", "HTTPS":
		if ss.TLS == nil {
			return nil, manifest.Errorf(path+".tls", "required for protocol %s", s.protocol)
		}
		if err := s.compileTLS(path+".tls", ss.TLS, warn); err != nil {
			return nil, err
		}
	case "":
		return nil, manifest.Errorf(path+".port.protocol", "required: TCP, TLS or HTTPS")
	case "HTTP", "HTTP2", "GRPC", "GRPC-WEB":
		if err := checkPlainHTTPTLS(path+".tls", ss.TLS); err != nil {
			return nil, err
		}
		if len(ss.Hosts) == 0 {
			return nil, manifest.Errorf(path+".hosts", "required: at least one host (\"*\" for any)")
		}
		return nil, notBound{fmt.Sprintf("protocol %s is L7; the gateway serves TCP, TLS and HTTPS at L4", s.protocol)}
	case "MONGO":
		s.mode = modeTCP
	default:
		return nil, manifest.Errorf(path+".port.protocol", "%q: not a protocol of Istio's Gateway (want HTTP, HTTPS, GRPC, HTTP2, MONGO, TCP or TLS)", ss.Port.Protocol)
	}
	if len(ss.Hosts) == 0 {
		return nil, manifest.Errorf(path+".hosts", "required: at least one host (\"*\" for any)")
	}
	for j, hs := range ss.Hosts {
		hp := fmt.Sprintf("%s.hosts[%d]", path, j)
		ns, name, scoped := strings.Cut(hs, "/")
		if !scoped {
			ns, name = "*", hs
		}
		switch {
		case ns == ".":
			ns = g.Metadata.Namespace
		case ns == "*":
		case len(validation.IsDNS1123Label(ns)) > 0:
			return nil, manifest.Errorf(hp, "%q: the namespace part must be \"*\", \".\" or a namespace", hs)
		}
		h, err := parseHost(hp, name)
		if err != nil {
			return nil, err
		}
		s.hosts = append(s.hosts, serverHost{ns: ns, host: h})
	}
	return s, nil
}

func (s *server) compileTLS(path string, t *serverTLSSpec, warn func(field, format string, args ...any)) error {
	if err := checkServerTLS(path, t); err != nil {
		return err
	}
	switch strings.ToUpper(t.Mode) {
	case "", "PASSTHROUGH": // Istio's default mode
		s.mode = modePassthrough
	case "SIMPLE":
		s.mode = modeSimple
	case "MUTUAL":
		s.mode = modeMutual
	case "ISTIO_MUTUAL":
		// Istio's validation: the mesh's own certificates, nothing else.
		for _, f := range []struct {
			name string
			set  bool
		}{{"serverCertificate", t.ServerCertificate != ""}, {"privateKey", t.PrivateKey != ""}, {"caCertificates", t.CACertificates != ""},
			{"tlsCertificates", !manifest.IsNull(t.TLSCertificates)}, {"credentialName", t.CredentialName != ""}, {"credentialNames", len(t.CredentialNames) > 0}} {
			if f.set {
				return manifest.Errorf(path+"."+f.name, "ISTIO_MUTUAL uses the mesh certificates; %s cannot be set", f.name)
			}
		}
		s.mode = modeIstioMutual
		return nil
	case "AUTO_PASSTHROUGH":
		s.mode = modeAutoPassthrough
		if t.CredentialName != "" || t.ServerCertificate != "" || t.PrivateKey != "" || t.CACertificates != "" {
			warn(path, "AUTO_PASSTHROUGH does not terminate TLS: certificates are ignored")
		}
		return nil
	case "OPTIONAL_MUTUAL":
		return notBound{"tls.mode OPTIONAL_MUTUAL is not served by meshproxy's gateway"}
	default:
		return manifest.Errorf(path+".mode", "%q: want SIMPLE, MUTUAL, PASSTHROUGH, ISTIO_MUTUAL, AUTO_PASSTHROUGH or OPTIONAL_MUTUAL", t.Mode)
	}
	if t.HTTPSRedirect {
		warn(path+".httpsRedirect", "ignored: HTTP redirects are L7")
	}
	for _, f := range []struct {
		name string
		set  bool
	}{{"cipherSuites", len(t.CipherSuites) > 0}, {"ecdhCurves", len(t.EcdhCurves) > 0}, {"alpnProtocols", len(t.ALPNProtocols) > 0}} {
		if f.set {
			warn(path+"."+f.name, "ignored: Go's defaults are used")
		}
	}
	if s.mode == modePassthrough {
		if t.CredentialName != "" || t.MinProtocolVersion != "" || t.MaxProtocolVersion != "" || t.ServerCertificate != "" || t.PrivateKey != "" || t.CACertificates != "" {
			warn(path, "PASSTHROUGH does not terminate TLS: certificates and protocol versions are ignored")
		}
		return nil
	}
	// What would change which certificate is served, or which clients are
	// accepted, and is not read: the server is not bound (fail closed).
	for _, f := range []struct {
		name string
		set  bool
		why  string
	}{
		{"serverCertificate", t.ServerCertificate != "", "certificate file paths are not read; use credentialName with files in --credentials-dir"},
		{"privateKey", t.PrivateKey != "", "certificate file paths are not read; use credentialName with files in --credentials-dir"},
		{"caCertificates", t.CACertificates != "", "certificate file paths are not read; use credentialName with files in --credentials-dir"},
		{"tlsCertificates", !manifest.IsNull(t.TLSCertificates), "certificate file paths are not read; use credentialName with files in --credentials-dir"},
		{"credentialNames", len(t.CredentialNames) > 0, "one credentialName per server is supported"},
		{"caCertCredentialName", t.CACertCredentialName != "", "the client CA is read from NAME-ca.crt beside the credentialName's files"},
		{"caCrl", t.CACrl != "", "certificate revocation lists are not supported"},
		{"subjectAltNames", len(t.SubjectAltNames) > 0, "client certificates are not matched by SAN"},
		{"verifyCertificateSpki", len(t.VerifyCertificateSpki) > 0, "certificate pinning is not supported"},
		{"verifyCertificateHash", len(t.VerifyCertificateHash) > 0, "certificate pinning is not supported"},
		{"insecureSkipVerify", !manifest.IsNull(t.InsecureSkipVerify), "MUTUAL always verifies client certificates"},
	} {
		if f.set {
			return notBound{fmt.Sprintf("%s.%s: %s", path, f.name, f.why)}
		}
	}
	if t.CredentialName == "" {
		return notBound{fmt.Sprintf("%s.credentialName: no certificate to serve (%s needs credentialName)", path, s.mode)}
	}
	if errs := validation.IsDNS1123Subdomain(t.CredentialName); len(errs) > 0 {
		return notBound{fmt.Sprintf("%s.credentialName %q does not name files in --credentials-dir: %s", path, t.CredentialName, strings.Join(errs, "; "))}
	}
	s.credential = t.CredentialName
	var err error
	if s.minVersion, err = tlsVersion(path+".minProtocolVersion", t.MinProtocolVersion, tls.VersionTLS12); err != nil {
		return err
	}
	if s.maxVersion, err = tlsVersion(path+".maxProtocolVersion", t.MaxProtocolVersion, tls.VersionTLS13); err != nil {
		return err
	}
	if s.minVersion > s.maxVersion {
		return manifest.Errorf(path, "minProtocolVersion is above maxProtocolVersion")
	}
	return nil
}

func tlsVersion(path, s string, def uint16) (uint16, error) {
	switch strings.ToUpper(s) {
	case "", "TLS_AUTO":
		return def, nil
	case "TLSV1_2":
		return tls.VersionTLS12, nil
	case "TLSV1_3":
		return tls.VersionTLS13, nil
	case "TLSV1_0", "TLSV1_1":
		return 0, manifest.Errorf(path, "%q: not supported by meshproxy: TLS 1.2 is the oldest version served", s)
	}
	return 0, manifest.Errorf(path, "%q: want TLS_AUTO, TLSV1_2 or TLSV1_3", s)
}

// compileService validates a VirtualService bound to this gateway. A route
// the gateway cannot follow (a subset, a destination without a port) is
// dropped alone, with a warning.
func compileService(v *serviceObj, services servicePorts, warn func(field, format string, args ...any)) (*vsCompiled, error) {
	vs := &vsCompiled{id: v.ID(), ns: v.Metadata.Namespace, exportTo: v.Spec.ExportTo}
	vs.http = !manifest.IsNull(v.Spec.HTTP) && strings.TrimSpace(string(v.Spec.HTTP)) != "[]"
	if len(v.Spec.Hosts) == 0 {
		return nil, manifest.Errorf("spec.hosts", "required: at least one host")
	}
	for i, hs := range v.Spec.Hosts {
		h, err := parseHost(fmt.Sprintf("spec.hosts[%d]", i), hs)
		if err != nil {
			return nil, err
		}
		vs.hosts = append(vs.hosts, h)
	}
	var err error
	if vs.gateways, err = gatewayRefs("spec.gateways", v.Spec.Gateways, vs.ns); err != nil {
		return nil, err
	}
	for i, e := range v.Spec.ExportTo {
		if e != "*" && e != "." && len(validation.IsDNS1123Label(e)) > 0 {
			return nil, manifest.Errorf(fmt.Sprintf("spec.exportTo[%d]", i), "%q: want \"*\", \".\" or a namespace", e)
		}
	}
	if !vs.http && len(v.Spec.TLS) == 0 && len(v.Spec.TCP) == 0 {
		return nil, manifest.Errorf("spec", "http, tcp or tls routes are required")
	}
	for i, r := range v.Spec.TLS {
		path := fmt.Sprintf("spec.tls[%d]", i)
		if len(r.Match) == 0 {
			return nil, manifest.Errorf(path+".match", "required: TLS routes match on sniHosts")
		}
		rs := &routeSpecCompiled{index: i}
		for j, m := range r.Match {
			mp := fmt.Sprintf("%s.match[%d]", path, j)
			mc, err := compileMatch(mp, m.Port, m.Gateways, vs.ns)
			if err != nil {
				return nil, err
			}
			if len(m.SNIHosts) == 0 {
				return nil, manifest.Errorf(mp+".sniHosts", "required")
			}
			for k, sh := range m.SNIHosts {
				h, err := parseHost(fmt.Sprintf("%s.sniHosts[%d]", mp, k), sh)
				if err != nil {
					return nil, err
				}
				if !slices.ContainsFunc(vs.hosts, h.subsetOf) {
					return nil, manifest.Errorf(fmt.Sprintf("%s.sniHosts[%d]", mp, k), "%q is not within any of the VirtualService's hosts %v", sh, v.Spec.Hosts)
				}
				mc.sni = append(mc.sni, h)
			}
			rs.matches = append(rs.matches, mc)
		}
		if err := rs.compileTargets(path, r.Route, vs.ns, services); err != nil {
			var rr routeRejected
			if errors.As(err, &rr) {
				warn(rr.field, "route %s rejected: %s", path, rr.why)
				continue
			}
			return nil, err
		}
		vs.tls = append(vs.tls, rs)
	}
	for i, r := range v.Spec.TCP {
		path := fmt.Sprintf("spec.tcp[%d]", i)
		rs := &routeSpecCompiled{index: i}
		for j, m := range r.Match {
			mc, err := compileMatch(fmt.Sprintf("%s.match[%d]", path, j), m.Port, m.Gateways, vs.ns)
			if err != nil {
				return nil, err
			}
			rs.matches = append(rs.matches, mc)
		}
		if err := rs.compileTargets(path, r.Route, vs.ns, services); err != nil {
			var rr routeRejected
			if errors.As(err, &rr) {
				warn(rr.field, "route %s rejected: %s", path, rr.why)
				continue
			}
			return nil, err
		}
		vs.tcp = append(vs.tcp, rs)
	}
	return vs, nil
}

func compileMatch(path string, port uint32, gateways []string, ns string) (matchCompiled, error) {
	var mc matchCompiled
	if port > 65535 {
		return mc, manifest.Errorf(path+".port", "want a port number 1-65535, got %d", port)
	}
	mc.port = uint16(port)
	var err error
	mc.gateways, err = gatewayRefs(path+".gateways", gateways, ns)
	return mc, err
}

// gatewayRefs resolves Gateway references ("name" in the service's
// namespace, or "namespace/name"); "mesh" (the sidecars) is dropped.
func gatewayRefs(path string, refs []string, ns string) ([]string, error) {
	var out []string
	for i, ref := range refs {
		if ref == "mesh" {
			continue
		}
		gns, name, scoped := strings.Cut(ref, "/")
		if !scoped {
			gns, name = ns, ref
		}
		if len(validation.IsDNS1123Label(gns)) > 0 || len(validation.IsDNS1123Subdomain(name)) > 0 {
			return nil, manifest.Errorf(fmt.Sprintf("%s[%d]", path, i), "%q: want NAME, NAMESPACE/NAME or mesh", ref)
		}
		out = append(out, gns+"/"+name)
	}
	return out, nil
}

func (rs *routeSpecCompiled) compileTargets(path string, targets []routeTargetSpec, ns string, services servicePorts) error {
	if len(targets) == 0 {
		return manifest.Errorf(path+".route", "required: at least one destination")
	}
	for i, t := range targets {
		tp := fmt.Sprintf("%s.route[%d]", path, i)
		if t.Destination == nil {
			return manifest.Errorf(tp+".destination", "required")
		}
		d, err := compileDestination(tp+".destination", t.Destination, ns, services)
		if err != nil {
			return err
		}
		if t.Weight < 0 {
			return manifest.Errorf(tp+".weight", "must not be negative")
		}
		d.weight = int(t.Weight)
		rs.weights += d.weight
		rs.dests = append(rs.dests, d)
	}
	if len(targets) > 1 && rs.weights == 0 {
		return manifest.Errorf(path+".route", "total destination weight = 0: give each destination a weight")
	}
	return nil
}

func compileDestination(path string, d *destinationSpec, ns string, services servicePorts) (destination, error) {
	var out destination
	h := strings.TrimSuffix(strings.ToLower(strings.TrimSpace(d.Host)), ".")
	if h == "" {
		return out, manifest.Errorf(path+".host", "required")
	}
	if a, err := netip.ParseAddr(h); err == nil {
		h = a.Unmap().String()
	} else if errs := validation.IsDNS1123Subdomain(h); len(errs) > 0 {
		return out, manifest.Errorf(path+".host", "%q: want a DNS name or an IP: %s", d.Host, strings.Join(errs, "; "))
	} else if !strings.Contains(h, ".") && h != "localhost" {
		// An Istio short name is relative to the VirtualService's namespace;
		// the resolver's search path completes "name.namespace".
		h += "." + ns
	}
	if d.Subset != "" {
		return out, routeRejected{path + ".subset", fmt.Sprintf("subset %q selects endpoints by label, which the gateway does not know; route to a host that reaches them", d.Subset)}
	}
	var port uint16
	switch {
	case d.Port != nil && d.Port.Number > 65535:
		return out, manifest.Errorf(path+".port.number", "want a port number 1-65535, got %d", d.Port.Number)
	case d.Port != nil && d.Port.Number != 0:
		port = uint16(d.Port.Number)
	default:
		ports, known := services.lookup(h)
		switch {
		case !known:
			return out, routeRejected{path + ".port.number", "no port, and no Service " + h + " among the configuration files to take it from; give destination.port.number"}
		case len(ports) != 1:
			return out, routeRejected{path + ".port.number", fmt.Sprintf("no port, and Service %s has %d ports; give destination.port.number", h, len(ports))}
		}
		port = ports[0] // the Service's only port, as Istio does
	}
	out.host, out.port = h, port
	out.addr = joinHostPort(h, out.port)
	return out, nil
}

// routeRejected drops one route of a VirtualService, not the document.
type routeRejected struct{ field, why string }

func (e routeRejected) Error() string { return e.field + ": " + e.why }

func joinHostPort(h string, port uint16) string {
	if strings.Contains(h, ":") {
		return "[" + h + "]:" + strconv.Itoa(int(port))
	}
	return h + ":" + strconv.Itoa(int(port))
}
