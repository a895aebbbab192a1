// Package certmanager is a ca.Signer that has cert-manager sign
// certificates, as istio-csr does: for each request it creates a
// cert-manager.io/v1 CertificateRequest with the CSR, the configured
// issuerRef, the duration and end-entity usages in its namespace, approves
// it when configured to (otherwise cert-manager's own approver or policy
// approver does), waits for Ready, returns status.certificate and deletes
// the request. Every cert-manager issuer (CA, Vault, Venafi, AWS PCA and
// Google CAS external issuers) can so sign for the mesh.
//
// cert-manager signs the CSR as it is, so the CSR must name the caller's
// SPIFFE ID as its only URI SAN; meshproxy refuses other CSRs before
// creating a request, and checks what cert-manager returns (ca.Authority)
// like for every external signer.
package certmanager
