// Package googlecas is a ca.Signer that has certificates signed by Google
// Cloud Certificate Authority Service: CreateCertificate in a CA pool
// (optionally on one CA of it, optionally with a certificate template) with
// the request's lifetime, the CSR's public key and the SPIFFE ID as the
// only URI SAN; the chain comes from the response. Credentials are
// Application Default Credentials (GOOGLE_APPLICATION_CREDENTIALS, workload
// identity, the metadata server).
//
// The certificate is described by a config, not by passing the CSR through:
// a sidecar's CSR may carry no SAN or any SAN, and meshproxy certifies the
// authenticated caller, not what the CSR claims. What CAS returns is checked
// by ca.Authority before use.
package googlecas
