package tlsmgr

import (
	"crypto"
	"crypto/x509"

	"github.com/meshproxy/meshproxy/internal/pemutil"
)

// ParseCertificatesPEM parses one or more PEM "CERTIFICATE" blocks, in
// order. Any other block type, trailing garbage that looks like PEM, or no
// certificate at all is an error.
func ParseCertificatesPEM(data []byte) ([]*x509.Certificate, error) {
	return pemutil.ParseCertificates(data)
}

// ParsePrivateKeyPEM parses the first private key in data: PKCS#8
// ("PRIVATE KEY"), SEC 1 ("EC PRIVATE KEY") or PKCS#1 ("RSA PRIVATE KEY").
// "EC PARAMETERS" blocks are skipped; encrypted keys are refused. Errors
// never contain key material.
func ParsePrivateKeyPEM(data []byte) (crypto.Signer, error) {
	return pemutil.ParsePrivateKey(data)
}
