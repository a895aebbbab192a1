// Package awspcatest is a fake AWS Private CA for tests: the ACMPrivateCA
// JSON 1.1 API over HTTPS (IssueCertificate, GetCertificate,
// GetCertificateAuthorityCertificate) that verifies each request's SigV4
// signature, signs with a real key from internal/testpki, and injects the
// failures the real service is known for: throttling, pending issuance, a
// template that drops the URI SAN, errors of any code.
package awspcatest
