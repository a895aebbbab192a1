// Package authn authenticates callers of the CA: it turns what a caller
// presents (a bearer token, a TLS client certificate) into the SPIFFE ID the
// CA will certify. Authenticators: static tokens from a file (Tokens),
// Kubernetes TokenReview (Kubernetes), offline JWT verification against a
// JWKS (JWKS), and SVID renewal by mTLS client certificate (SVID). Chain
// tries several in order.
package authn
