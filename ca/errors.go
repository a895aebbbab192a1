package ca

import "errors"

// Sentinel errors that callers branch on (the gRPC server maps them to
// status codes and metric reasons). Returned errors wrap them with detail.
var (
	// ErrBadCSR: the CSR is not PEM/DER, does not parse, or its signature
	// does not verify.
	ErrBadCSR = errors.New("bad certificate signing request")
	// ErrUnsupportedKey: the CSR's public key is not ECDSA P-256/P-384 or
	// RSA of 2048 to 8192 bits.
	ErrUnsupportedKey = errors.New("unsupported public key")
	// ErrTTLTooLong: the requested validity exceeds the CA's maximum.
	ErrTTLTooLong = errors.New("requested validity exceeds the maximum")
	// ErrOutsideTrustDomain: the identity to certify is not in the CA's
	// trust domain.
	ErrOutsideTrustDomain = errors.New("identity outside the CA's trust domain")
	// ErrCAExpired: the CA's own chain has expired (or will within the
	// minimum leaf lifetime), so it cannot issue.
	ErrCAExpired = errors.New("ca chain expired")
	// ErrExists: Init found an existing CA in the directory and was not
	// asked to overwrite it.
	ErrExists = errors.New("a CA already exists in the directory")
	// ErrInvalidCA: a CA directory's files are missing, malformed or
	// inconsistent (key does not match, cert is not a CA, no chain to a root).
	ErrInvalidCA = errors.New("invalid CA")
)
