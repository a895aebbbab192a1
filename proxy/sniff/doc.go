// Package sniff classifies a new inbound connection by its first bytes:
// a TLS ClientHello offering an Istio ALPN ("istio", "istio-http/1.1", …) is
// mesh mTLS, any other ClientHello is the application's own TLS, and
// anything else — or nothing before the detect timeout, as with
// server-speaks-first protocols — is plaintext.
//
// Sniff reads through a recording reader and returns a Conn that replays
// every byte it consumed before reading on from the network, so nothing is
// ever lost whichever way the connection is then handled. The ClientHello is
// parsed by crypto/tls itself (a throwaway server whose GetConfigForClient
// captures the hello and aborts), never by a hand parser, and is bounded to
// one TLS record of at most 16 KiB.
package sniff
