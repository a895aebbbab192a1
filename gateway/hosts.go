package gateway

import (
	"net/netip"
	"strings"

	"github.com/meshproxy/meshproxy/internal/manifest"
	"k8s.io/apimachinery/pkg/util/validation"
)

// host is a lower-case host pattern as Istio writes them: "*" (anything),
// "*.example.com" (any name ending in .example.com, at any depth, but not
// example.com itself), or an exact name.
type host string

const anyHost host = "*"

// parseHost validates a host pattern; path names the field in errors.
func parseHost(path, s string) (host, error) {
	h := strings.TrimSuffix(strings.ToLower(strings.TrimSpace(s)), ".")
	if h == "*" {
		return anyHost, nil
	}
	if _, err := netip.ParseAddr(h); err == nil {
		return host(h), nil
	}
	name, wild := strings.CutPrefix(h, "*.")
	if errs := validation.IsDNS1123Subdomain(name); h == "" || len(errs) > 0 {
		return "", manifest.Errorf(path, "%q: want \"*\", \"*.DOMAIN\", a DNS name or an IP: %s", s, strings.Join(errs, "; "))
	}
	if !wild && strings.Contains(name, "*") {
		return "", manifest.Errorf(path, "%q: a wildcard may only be the whole first label (*.example.com)", s)
	}
	return host(h), nil
}

func (h host) wildcard() bool { return h == anyHost || strings.HasPrefix(string(h), "*.") }

// matches reports whether the concrete name (an SNI, lower case, "" when
// the client sent none) is covered by h. Only "*" covers a missing SNI.
func (h host) matches(name string) bool {
	switch {
	case h == anyHost:
		return true
	case name == "":
		return false
	case strings.HasPrefix(string(h), "*."):
		suffix := string(h[1:]) // ".example.com"
		return len(name) > len(suffix) && strings.HasSuffix(name, suffix)
	}
	return name == string(h)
}

// subsetOf reports whether every name h covers is covered by o too, as
// Istio's host.Name.SubsetOf (an SNI host of a route within the
// VirtualService's hosts).
func (h host) subsetOf(o host) bool {
	switch {
	case o == anyHost:
		return true
	case h == anyHost:
		return false
	case h.wildcard() && o.wildcard():
		return strings.HasSuffix(string(h[1:]), string(o[1:]))
	case o.wildcard():
		return o.matches(string(h))
	}
	return h == o
}

// intersects reports whether some name is covered by both patterns.
func (h host) intersects(o host) bool {
	switch {
	case h == anyHost || o == anyHost:
		return true
	case h.wildcard() && o.wildcard():
		return strings.HasSuffix(string(h[1:]), string(o[1:])) || strings.HasSuffix(string(o[1:]), string(h[1:]))
	case h.wildcard():
		return h.matches(string(o))
	case o.wildcard():
		return o.matches(string(h))
	}
	return h == o
}

// specificity orders patterns matching the same name: an exact name beats
// any wildcard, a longer wildcard beats a shorter one, "*" comes last.
func (h host) specificity() int {
	switch {
	case h == anyHost:
		return 0
	case h.wildcard():
		return len(h)
	}
	return 1<<16 + len(h)
}

func anyMatches(hs []host, name string) bool {
	for _, h := range hs {
		if h.matches(name) {
			return true
		}
	}
	return false
}

func hostStrings(hs []host) []string {
	out := make([]string, len(hs))
	for i, h := range hs {
		out[i] = string(h)
	}
	return out
}

// normalizeSNI lower-cases a server name from a ClientHello and drops a
// trailing dot, so it compares with host patterns.
func normalizeSNI(s string) string { return strings.TrimSuffix(strings.ToLower(s), ".") }
