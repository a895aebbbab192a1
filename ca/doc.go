// Package ca is meshproxy's certificate authority: it keeps a root and a
// signing (intermediate) certificate in Istio's plugged-in layout on disk
// (Init, Load), turns certificate signing requests into short-lived
// X.509-SVIDs for authenticated callers (Authority), and serves Istio's CA
// gRPC API, istio.v1.auth.IstioCertificateService, over TLS (Server).
//
// The identity in an issued certificate always comes from the caller's
// authentication (package ca/authn), never from the CSR: the CSR contributes
// only its public key, after its own signature has been checked.
//
// The signature itself comes from a Signer: the CA key on disk (New, Load)
// or an external CA (NewFromSigner with ca/stepca or ca/vault). Whatever an
// external CA returns is checked against the same identity rules before it
// is handed out.
package ca
