package pemutil

import (
	"bytes"
	"crypto"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
)

// ParseCertificates parses one or more PEM "CERTIFICATE" blocks, in order.
// Text before and between blocks is ignored (openssl writes some); any
// other block type, text after the last block (a truncated or corrupted
// file), or no certificate at all, is an error.
func ParseCertificates(data []byte) ([]*x509.Certificate, error) {
	var certs []*x509.Certificate
	for i := 1; ; i++ {
		block, rest := pem.Decode(data)
		if block == nil {
			break
		}
		data = rest
		if block.Type != "CERTIFICATE" {
			return nil, fmt.Errorf("PEM block %d: unexpected type %q, want CERTIFICATE", i, block.Type)
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("PEM block %d: %w", i, err)
		}
		certs = append(certs, c)
	}
	if len(certs) == 0 {
		return nil, errors.New("no PEM CERTIFICATE block found")
	}
	if err := trailing(data, len(certs)); err != nil {
		return nil, err
	}
	return certs, nil
}

// trailing refuses anything but whitespace in rest, what follows the last
// PEM block (the n-th): pem.Decode skips it silently, so a truncated block
// or appended junk would otherwise go unnoticed.
func trailing(rest []byte, n int) error {
	if t := bytes.TrimSpace(rest); len(t) > 0 {
		return fmt.Errorf("%d bytes of non-PEM data after PEM block %d (truncated or corrupted file?)", len(t), n)
	}
	return nil
}

// ParsePrivateKey parses the first private key in data: PKCS#8
// ("PRIVATE KEY"), SEC 1 ("EC PRIVATE KEY", possibly after the "EC
// PARAMETERS" block openssl writes) or PKCS#1 ("RSA PRIVATE KEY").
// Encrypted keys, PKCS#8 or legacy (Proc-Type header), are refused, and so
// is text after the last PEM block of data. Errors never contain key
// material.
func ParsePrivateKey(data []byte) (crypto.Signer, error) {
	if err := trailingAfterBlocks(data); err != nil {
		return nil, err
	}
	for {
		var block *pem.Block
		block, data = pem.Decode(data)
		if block == nil {
			return nil, errors.New("no PEM private key block found")
		}
		if _, encrypted := block.Headers["Proc-Type"]; encrypted {
			return nil, errors.New("encrypted PEM private keys are not supported")
		}
		var (
			key any
			err error
		)
		switch block.Type {
		case "EC PARAMETERS":
			continue
		case "PRIVATE KEY":
			key, err = x509.ParsePKCS8PrivateKey(block.Bytes)
		case "EC PRIVATE KEY":
			key, err = x509.ParseECPrivateKey(block.Bytes)
		case "RSA PRIVATE KEY":
			key, err = x509.ParsePKCS1PrivateKey(block.Bytes)
		case "ENCRYPTED PRIVATE KEY":
			return nil, errors.New("encrypted PKCS#8 private keys are not supported")
		default:
			return nil, fmt.Errorf("unexpected PEM block type %q, want a private key", block.Type)
		}
		if err != nil {
			return nil, fmt.Errorf("parse %s: %w", block.Type, err)
		}
		signer, ok := key.(crypto.Signer)
		if !ok {
			return nil, fmt.Errorf("unsupported private key type %T", key)
		}
		return signer, nil
	}
}

// trailingAfterBlocks is trailing for data as a whole: every PEM block is
// skipped, whatever its type, and what follows the last must be blank.
func trailingAfterBlocks(data []byte) error {
	n := 0
	for {
		block, rest := pem.Decode(data)
		if block == nil {
			if n == 0 {
				return nil // "no PEM block" is reported by the caller
			}
			return trailing(data, n)
		}
		data, n = rest, n+1
	}
}
