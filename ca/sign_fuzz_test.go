package ca

import (
	"context"
	"crypto/x509"
	"errors"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc/metadata"

	"github.com/meshproxy/meshproxy/ca/authn"
)

// FuzzSign hands arbitrary bytes to the authority as a caller's CSR. It must
// never panic; a refusal must be ErrBadCSR or ErrUnsupportedKey; and
// whatever the CSR asks for (other SPIFFE IDs, DNS or IP SANs, CA:TRUE), an
// issued certificate is a plain leaf for the authenticated caller alone, over
// the CSR's own key. Seeds: testdata/fuzz/FuzzSign.
func FuzzSign(f *testing.F) {
	a, _ := testAuthority(f, 30*24*time.Hour)
	caller := spiffeid.RequireFromString("spiffe://cluster.local/ns/demo/sa/client")
	f.Fuzz(func(t *testing.T, csr []byte) {
		leaf, err := a.Sign(csr, caller, time.Hour)
		if err != nil {
			if !errors.Is(err, ErrBadCSR) && !errors.Is(err, ErrUnsupportedKey) {
				t.Fatalf("refusal is neither ErrBadCSR nor ErrUnsupportedKey: %v", err)
			}
			return
		}
		req, err := parseCSR(csr)
		if err != nil {
			t.Fatalf("signed a CSR that does not parse: %v", err)
		}
		if !publicKeysEqual(req.PublicKey, leaf.PublicKey) {
			t.Fatal("certificate is not over the CSR's key")
		}
		id, _, err := x509svid.Verify([]*x509.Certificate{leaf, a.Chain()[0]}, a.Bundle())
		if err != nil {
			t.Fatalf("issued certificate does not verify as an SVID: %v", err)
		}
		if id != caller {
			t.Fatalf("certificate for %s, caller is %s", id, caller)
		}
		if len(leaf.URIs) != 1 || len(leaf.DNSNames) != 0 || len(leaf.IPAddresses) != 0 || len(leaf.EmailAddresses) != 0 {
			t.Fatalf("SANs copied from the CSR: uris %v dns %v ips %v emails %v", leaf.URIs, leaf.DNSNames, leaf.IPAddresses, leaf.EmailAddresses)
		}
		if leaf.IsCA || leaf.KeyUsage&(x509.KeyUsageCertSign|x509.KeyUsageCRLSign) != 0 {
			t.Fatal("issued a CA certificate")
		}
		if life := leaf.NotAfter.Sub(leaf.NotBefore); life > time.Hour+ClockSkew+time.Minute {
			t.Fatalf("lifetime %s exceeds the hour asked for", life)
		}
	})
}

// FuzzBearerToken runs arbitrary authorization header values through the
// server's header parsing and the token authenticator, whose only token is
// "s3cret". The caller is authenticated exactly when the header carries that
// token under the Bearer scheme; nothing else, however close, gets in.
// Seeds: testdata/fuzz/FuzzBearerToken.
func FuzzBearerToken(f *testing.F) {
	const token, id = "s3cret", "spiffe://cluster.local/ns/demo/sa/client"
	path := filepath.Join(f.TempDir(), "tokens")
	writeFile(f, path, []byte(token+" "+id+"\n"))
	toks, err := authn.NewTokens(path, authn.WithLogger(quietLogger()))
	if err != nil {
		f.Fatal(err)
	}
	chain := authn.Chain{toks}
	f.Fuzz(func(t *testing.T, header string) {
		ctx := metadata.NewIncomingContext(context.Background(), metadata.Pairs("authorization", header))
		caller, _ := callerFrom(ctx)
		if caller.Token != strings.TrimSpace(caller.Token) {
			t.Fatalf("token %q keeps surrounding whitespace", caller.Token)
		}
		if caller.Token != "" {
			scheme, _, _ := strings.Cut(strings.TrimSpace(header), " ")
			if !strings.EqualFold(scheme, "bearer") {
				t.Fatalf("token taken from a %q header", scheme)
			}
		}
		res, err := chain.AuthenticateResult(context.Background(), caller)
		if (err == nil) != (caller.Token == token) {
			t.Fatalf("header %q: token %q, authentication error %v", header, caller.Token, err)
		}
		if err == nil && res.ID.String() != id {
			t.Fatalf("authenticated as %s, want %s", res.ID, id)
		}
		if err != nil && !errors.Is(err, authn.ErrUnauthenticated) {
			t.Fatalf("refusal is not Unauthenticated: %v", err)
		}
	})
}
