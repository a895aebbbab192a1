// Package vaulttest is a stand-in for a Vault server's PKI secrets engine,
// for tests: Vault itself cannot run here. It speaks Vault's real HTTP API
// for the calls meshproxy makes — the X-Vault-Token header, JSON bodies,
// {"data": {...}} answers and {"errors": [...]} refusals — and signs with a
// testpki CA the way a PKI role does.
package vaulttest
