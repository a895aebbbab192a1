// Package pemutil parses PEM certificates and private keys the one way
// meshproxy reads them, for the sidecar (tlsmgr) and the CA (ca) alike:
// certificate blocks strictly in order, and the first private key in any of
// the encodings CA tooling writes. Errors name the block, never its bytes,
// so key material cannot reach a log.
package pemutil
