// Package caclient is a tlsmgr.Issuer that asks a certificate authority
// speaking Istio's CA API (istio.v1.auth.IstioCertificateService, served by
// meshproxy ca and by istiod) to sign CSRs over TLS. The caller authenticates
// with a bearer token re-read from a file on every request (projected
// ServiceAccount tokens rotate), or with its current SVID as a TLS client
// certificate when the CA renews identities by SVID.
package caclient
