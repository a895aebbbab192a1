// Package vault is a ca.Signer that has certificates signed by a HashiCorp
// Vault PKI secrets engine through its sign endpoint,
// POST /v1/<mount>/sign/<role> with the CSR, the SPIFFE ID as uri_sans and
// the TTL, authenticated by a Vault token read from a file (as a Vault Agent
// sink writes it) for every request.
//
// meshproxy keeps authenticating its callers itself; what Vault returns is
// checked by ca.Authority before use, so a role that copies SANs from the
// CSR (use_csr_sans) or adds the common name cannot widen an identity.
package vault
