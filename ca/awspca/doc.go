// Package awspca is a ca.Signer that has certificates signed by an AWS
// Private CA (ACM PCA): IssueCertificate with the CSR, the
// EndEntityCertificate_APIPassthrough template so that the SPIFFE ID travels
// as the URI SAN of ApiPassthrough (never the CSR's own SANs), an absolute
// validity, then GetCertificate, polled by the SDK's CertificateIssued
// waiter, for the leaf and its chain. Credentials come from the SDK's
// default chain (environment, shared files, web identity / IRSA, ECS and
// EC2 roles).
//
// Throttling (ThrottlingException) and pending issuance
// (RequestInProgressException) are retried with backoff until the
// request's deadline; meshproxy keeps authenticating its callers itself and
// what AWS returns is checked by ca.Authority before use.
package awspca
