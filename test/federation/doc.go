// Package federation tests trust-domain federation with real processes:
// two meshproxy CAs of different trust domains serving their bundle
// endpoints, and a sidecar of each federating with the other's. Cross-domain
// mutual TLS works where an AuthorizationPolicy names the foreign trust
// domain and is refused (reason foreign_trust_domain) where none does.
package federation
