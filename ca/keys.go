package ca

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"slices"

	"github.com/meshproxy/meshproxy/internal/pemutil"
)

// KeyType names the algorithm of the keys Init generates for the root and
// the signing certificate.
type KeyType string

// Key types accepted by Init (and by --key-type).
const (
	KeyECDSAP256 KeyType = "ecdsa-p256"
	KeyECDSAP384 KeyType = "ecdsa-p384"
	KeyRSA2048   KeyType = "rsa-2048"
	KeyRSA4096   KeyType = "rsa-4096"
)

// KeyTypes lists the supported key types, default first.
var KeyTypes = []KeyType{KeyECDSAP256, KeyECDSAP384, KeyRSA2048, KeyRSA4096}

// ParseKeyType validates s as a KeyType.
func ParseKeyType(s string) (KeyType, error) {
	if slices.Contains(KeyTypes, KeyType(s)) {
		return KeyType(s), nil
	}
	return "", fmt.Errorf("unknown key type %q (want one of %v)", s, KeyTypes)
}

func (k KeyType) generate() (crypto.Signer, error) {
	switch k {
	case KeyECDSAP256:
		return ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	case KeyECDSAP384:
		return ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	case KeyRSA2048:
		return rsa.GenerateKey(rand.Reader, 2048)
	case KeyRSA4096:
		return rsa.GenerateKey(rand.Reader, 4096)
	}
	return nil, fmt.Errorf("unknown key type %q", k)
}

// Limits on RSA keys in CSRs: below 2048 is weak, above 8192 only costs
// the CA CPU time to verify.
const (
	minRSABits = 2048
	maxRSABits = 8192
)

// checkLeafKey enforces the key types workload certificates may carry.
func checkLeafKey(pub any) error {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		switch k.Curve {
		case elliptic.P256(), elliptic.P384():
			return nil
		}
		return fmt.Errorf("%w: ECDSA curve %s (want P-256 or P-384)", ErrUnsupportedKey, k.Curve.Params().Name)
	case *rsa.PublicKey:
		if bits := k.N.BitLen(); bits < minRSABits || bits > maxRSABits {
			return fmt.Errorf("%w: RSA-%d (want %d to %d bits)", ErrUnsupportedKey, bits, minRSABits, maxRSABits)
		}
		return nil
	}
	return fmt.Errorf("%w: %T (want ECDSA P-256/P-384 or RSA >= %d bits)", ErrUnsupportedKey, pub, minRSABits)
}

// marshalKeyPEM encodes a private key as PKCS#8 PEM.
func marshalKeyPEM(key crypto.Signer) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("marshal private key: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

// parseKeyPEM reads the first private key in data, in any of the encodings
// CA tooling writes (see pemutil.ParsePrivateKey), and refuses key types a
// CA does not sign with.
func parseKeyPEM(data []byte) (crypto.Signer, error) {
	signer, err := pemutil.ParsePrivateKey(data)
	if err != nil {
		return nil, err
	}
	switch signer.(type) {
	case *ecdsa.PrivateKey, *rsa.PrivateKey:
		return signer, nil
	}
	return nil, fmt.Errorf("CA key type %T is not supported (want ECDSA or RSA)", signer)
}

// parseCertsPEM reads every CERTIFICATE block in data; other PEM blocks are
// an error, text between blocks is ignored (openssl writes some).
func parseCertsPEM(data []byte) ([]*x509.Certificate, error) {
	return pemutil.ParseCertificates(data)
}

// certsPEM encodes certificates as concatenated PEM blocks.
func certsPEM(certs ...*x509.Certificate) []byte {
	var out []byte
	for _, c := range certs {
		out = append(out, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})...)
	}
	return out
}

func pemCert(der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}
