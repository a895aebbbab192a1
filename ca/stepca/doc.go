// Package stepca is a ca.Signer that has certificates signed by a step-ca
// server (github.com/smallstep/certificates) through its sign API,
// POST /1.0/sign, authorized by a one-time token (a JWT) signed with a JWK
// provisioner's private key.
//
// meshproxy keeps authenticating its callers itself and sends step-ca only
// the CSR and a token whose subject and sans claim are the caller's SPIFFE
// ID; what step-ca returns is checked by ca.Authority before use. The
// provisioner's X.509 template must put the token's sans into the leaf as
// its only SANs (see TemplateSPIFFE).
package stepca
