// Package authntest provides test doubles that speak the real wire formats
// the CA's authenticators consume: a Kubernetes API server answering
// TokenReviews (authentication.k8s.io/v1 JSON over TLS, checking the
// caller's credentials like the real one) and a JWT issuer with its JWKS.
package authntest
