package stepca

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rsa"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"unicode"

	"github.com/go-jose/go-jose/v4"

	"github.com/meshproxy/meshproxy/internal/fileread"
)

// maxKeyFile bounds the provisioner key and password files.
const maxKeyFile = fileread.MaxPEM

// ErrKeyEncrypted is returned by ParseProvisionerKey for an encrypted key
// given without a password.
var ErrKeyEncrypted = errors.New("provisioner key is encrypted and no password was given")

// Key algorithms accepted for encrypted provisioner keys: the PBES2 family
// step-ca and the step CLI use (PBES2-HS256+A128KW with A256GCM).
var (
	pbes2Algorithms = []jose.KeyAlgorithm{jose.PBES2_HS256_A128KW, jose.PBES2_HS384_A192KW, jose.PBES2_HS512_A256KW}
	contentEncs     = []jose.ContentEncryption{jose.A128GCM, jose.A192GCM, jose.A256GCM}
)

// LoadProvisionerKey reads a JWK provisioner's private key from path, see
// ParseProvisionerKey. passwordFile may be empty for an unencrypted key;
// trailing white space in it is ignored, as the step CLI does.
func LoadProvisionerKey(path, passwordFile string) (*jose.JSONWebKey, error) {
	data, err := readLimited(path)
	if err != nil {
		return nil, fmt.Errorf("provisioner key: %w", err)
	}
	var password []byte
	if passwordFile != "" {
		if password, err = readLimited(passwordFile); err != nil {
			return nil, fmt.Errorf("provisioner key password: %w", err)
		}
		password = bytes.TrimRightFunc(password, unicode.IsSpace)
		if len(password) == 0 {
			return nil, fmt.Errorf("provisioner key password file %s is empty", passwordFile)
		}
	}
	key, err := ParseProvisionerKey(data, password)
	if err != nil {
		return nil, fmt.Errorf("provisioner key %s: %w", path, err)
	}
	return key, nil
}

func readLimited(path string) ([]byte, error) {
	return fileread.Read(path, maxKeyFile)
}

// ParseProvisionerKey parses a JWK provisioner's private key in any of the
// forms step keeps it: a plain JWK (JSON), or a JWK encrypted with a
// password (PBES2) as a JWE in compact serialization (the "encryptedKey" of
// a provisioner in step-ca's ca.json) or JSON serialization (what
// `step crypto jwk create` writes). The key must be a private EC, Ed25519 or
// RSA key; its "kid" defaults to its RFC 7638 thumbprint, as step sets it,
// and its "alg" to the algorithm of its type.
func ParseProvisionerKey(data, password []byte) (*jose.JSONWebKey, error) {
	data = bytes.TrimSpace(data)
	if len(data) == 0 {
		return nil, errors.New("empty")
	}
	plain := data
	if encrypted(data) {
		if len(password) == 0 {
			return nil, ErrKeyEncrypted
		}
		parse := jose.ParseEncryptedCompact
		if data[0] == '{' {
			parse = jose.ParseEncryptedJSON
		}
		jwe, err := parse(string(data), pbes2Algorithms, contentEncs)
		if err != nil {
			return nil, fmt.Errorf("parse encrypted key: %w", err)
		}
		if plain, err = jwe.Decrypt(password); err != nil {
			return nil, fmt.Errorf("decrypt key (wrong password?): %w", err)
		}
	}
	var key jose.JSONWebKey
	if err := json.Unmarshal(plain, &key); err != nil {
		return nil, fmt.Errorf("parse JWK: %w", err)
	}
	if key.IsPublic() {
		return nil, errors.New("the JWK is a public key; the provisioner's private key is needed")
	}
	if !key.Valid() {
		return nil, errors.New("invalid JWK")
	}
	alg, err := signatureAlgorithm(key.Key)
	if err != nil {
		return nil, err
	}
	if key.Algorithm == "" {
		key.Algorithm = string(alg)
	}
	if key.KeyID == "" {
		tp, err := key.Thumbprint(crypto.SHA256)
		if err != nil {
			return nil, fmt.Errorf("JWK thumbprint: %w", err)
		}
		key.KeyID = base64.RawURLEncoding.EncodeToString(tp)
	}
	return &key, nil
}

// encrypted tells a JWE (compact: five dot-separated parts; JSON: has a
// ciphertext) from a plain JWK.
func encrypted(data []byte) bool {
	if data[0] != '{' {
		return strings.Count(string(data), ".") == 4
	}
	var probe struct {
		Ciphertext *string `json:"ciphertext"`
	}
	return json.Unmarshal(data, &probe) == nil && probe.Ciphertext != nil
}

// signatureAlgorithm is the JWS algorithm step uses for a key type.
func signatureAlgorithm(key any) (jose.SignatureAlgorithm, error) {
	switch k := key.(type) {
	case *ecdsa.PrivateKey:
		switch k.Curve {
		case elliptic.P256():
			return jose.ES256, nil
		case elliptic.P384():
			return jose.ES384, nil
		case elliptic.P521():
			return jose.ES512, nil
		}
		return "", fmt.Errorf("unsupported EC curve %s", k.Curve.Params().Name)
	case ed25519.PrivateKey:
		return jose.EdDSA, nil
	case *rsa.PrivateKey:
		return jose.RS256, nil
	}
	return "", fmt.Errorf("unsupported provisioner key type %T (want EC, Ed25519 or RSA)", key)
}
