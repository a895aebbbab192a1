package main

import (
	"context"
	"net"
	"net/netip"

	"github.com/meshproxy/meshproxy/policy"
	"github.com/meshproxy/meshproxy/proxy/mesh"
)

const dnsServerUsage = "IP:PORT of the DNS server asked for DestinationRule hosts and destinations named by host name, " +
	"instead of the nameservers of /etc/resolv.conf (its search path and options still apply; /etc/hosts is read first)"

// dnsResolver is the resolver of --dns-server: Go's own, which reads
// /etc/hosts first and applies /etc/resolv.conf's search path and options,
// but sends every query to server rather than to resolv.conf's nameservers.
// Nil without the flag: the system's resolver.
func dnsResolver(server string) (*net.Resolver, error) {
	if server == "" {
		return nil, nil
	}
	ap, err := netip.ParseAddrPort(server)
	if err != nil || ap.Port() == 0 {
		return nil, usagef("--dns-server %q: want IP:PORT, e.g. 10.96.0.10:53", server)
	}
	addr := ap.String()
	return &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, network, addr)
	}}, nil
}

// dialer is the data plane's dialer: host names through --dns-server, if set.
func (f *serveFlags) dialer() *net.Dialer {
	return &net.Dialer{Timeout: mesh.DefaultDialTimeout, Resolver: f.resolver}
}

// policyResolver resolves DestinationRule hosts through --dns-server (the
// system's resolver without it).
func (f *serveFlags) policyResolver() policy.Option {
	if f.resolver == nil {
		return policy.WithResolver(nil) // keeps the default
	}
	return policy.WithResolver(policy.ResolveWith(f.resolver))
}

// noResolve is the resolver of a policy store made only to check a
// directory: its DestinationRule hosts need no addresses, so no query is
// sent for them.
func noResolve(context.Context, string) ([]netip.Addr, error) { return nil, nil }
