package main

import (
	"context"
	"crypto/x509"
	"fmt"
	"log/slog"
	"slices"
	"strings"

	"github.com/spf13/pflag"

	"github.com/meshproxy/meshproxy/ca"
	"github.com/meshproxy/meshproxy/ca/stepca"
	"github.com/meshproxy/meshproxy/ca/vault"
	"github.com/meshproxy/meshproxy/internal/fileread"
	"github.com/meshproxy/meshproxy/tlsmgr"
)

// Signers of --signer.
var signerNames = []string{ca.SignerBuiltin, ca.SignerStepCA, ca.SignerVault}

// signerHelp is the part of `ca serve --help` about --signer.
const signerHelp = `
The certificate is signed by --signer:

  builtin   the CA key in --dir (Istio's plugged-in layout); the default.
  stepca    a step-ca server: POST /1.0/sign at --stepca-url with a one-time
            token signed by the JWK provisioner --stepca-provisioner, whose
            private key is --stepca-provisioner-key (a JWK, or the encrypted
            JWE of ca.json's "encryptedKey" with
            --stepca-provisioner-password-file). --stepca-root is step-ca's
            root: it verifies step-ca's TLS and is the trust bundle.
  vault     a Vault PKI secrets engine: POST /v1/--vault-mount/sign/--vault-role
            at --vault-addr with the token in --vault-token-file (re-read for
            every request). Vault's TLS comes from VAULT_CACERT and friends.
            The trust bundle is --vault-root, or else the self-signed
            certificates of the mount's CA chain, read at start.

With an external signer meshproxy still authenticates every caller and only
delegates the signature; a certificate that is not an X.509-SVID for exactly
the caller's SPIFFE ID (its only URI SAN, no unrequested SAN), for the CSR's
key, chaining to the backend's root, not a CA and valid for at most --max-ttl
is refused (Internal, counted as reason backend_invalid). An unreachable
backend is Unavailable (backend_unavailable), a refusal Internal
(backend_error). The CA's own serving certificate is signed by the backend too.
`

// signerFlags are the --signer flags of `ca serve`.
type signerFlags struct {
	signer string

	stepcaURL, stepcaRoot, stepcaProvisioner, stepcaKey, stepcaPasswordFile string

	vaultAddr, vaultTokenFile, vaultMount, vaultRole, vaultRoot string
}

func (sf *signerFlags) register(f *pflag.FlagSet) {
	f.StringVar(&sf.signer, "signer", ca.SignerBuiltin, "who signs certificates: "+strings.Join(signerNames, ", "))
	f.StringVar(&sf.stepcaURL, "stepca-url", "", "step-ca address for --signer stepca, e.g. https://step-ca.internal:9000")
	f.StringVar(&sf.stepcaRoot, "stepca-root", "", "step-ca's root certificate(s), PEM, for --signer stepca")
	f.StringVar(&sf.stepcaProvisioner, "stepca-provisioner", "", "name of step-ca's JWK provisioner for --signer stepca")
	f.StringVar(&sf.stepcaKey, "stepca-provisioner-key", "", "the JWK provisioner's private key: a JWK, or a password-encrypted JWE")
	f.StringVar(&sf.stepcaPasswordFile, "stepca-provisioner-password-file", "", "password of an encrypted --stepca-provisioner-key")
	f.StringVar(&sf.vaultAddr, "vault-addr", "", "Vault address for --signer vault, e.g. https://vault.internal:8200")
	f.StringVar(&sf.vaultTokenFile, "vault-token-file", "", "file holding the Vault token for --signer vault, re-read for every request")
	f.StringVar(&sf.vaultMount, "vault-mount", vault.DefaultMount, "path of Vault's PKI secrets engine")
	f.StringVar(&sf.vaultRole, "vault-role", "", "Vault PKI role that signs for --signer vault")
	f.StringVar(&sf.vaultRoot, "vault-root", "", "Vault's root certificate(s), PEM (default: the self-signed certificates of the mount's CA chain)")
}

// validate reports flag combinations that cannot work, naming the flag.
func (sf *signerFlags) validate(dir string) error {
	if !slices.Contains(signerNames, sf.signer) {
		return usagef("--signer: unknown signer %q (want %s)", sf.signer, strings.Join(signerNames, ", "))
	}
	set := func(pairs ...string) []string {
		var names []string
		for i := 0; i < len(pairs); i += 2 {
			if pairs[i+1] != "" {
				names = append(names, "--"+pairs[i])
			}
		}
		return names
	}
	stepcaSet := set("stepca-url", sf.stepcaURL, "stepca-root", sf.stepcaRoot, "stepca-provisioner", sf.stepcaProvisioner,
		"stepca-provisioner-key", sf.stepcaKey, "stepca-provisioner-password-file", sf.stepcaPasswordFile)
	vaultSet := set("vault-addr", sf.vaultAddr, "vault-token-file", sf.vaultTokenFile, "vault-role", sf.vaultRole, "vault-root", sf.vaultRoot)
	if sf.vaultMount != vault.DefaultMount {
		vaultSet = append(vaultSet, "--vault-mount")
	}
	if sf.signer != ca.SignerStepCA && len(stepcaSet) > 0 {
		return usagef("%s set but --signer is %s, not stepca", strings.Join(stepcaSet, ", "), sf.signer)
	}
	if sf.signer != ca.SignerVault && len(vaultSet) > 0 {
		return usagef("%s set but --signer is %s, not vault", strings.Join(vaultSet, ", "), sf.signer)
	}
	switch sf.signer {
	case ca.SignerBuiltin:
		if dir == "" {
			return usagef("--dir is required")
		}
		return nil
	case ca.SignerStepCA:
		switch {
		case sf.stepcaURL == "":
			return usagef("--signer stepca needs --stepca-url")
		case sf.stepcaRoot == "":
			return usagef("--signer stepca needs --stepca-root")
		case sf.stepcaProvisioner == "":
			return usagef("--signer stepca needs --stepca-provisioner")
		case sf.stepcaKey == "":
			return usagef("--signer stepca needs --stepca-provisioner-key")
		}
	case ca.SignerVault:
		switch {
		case sf.vaultAddr == "":
			return usagef("--signer vault needs --vault-addr")
		case sf.vaultTokenFile == "":
			return usagef("--signer vault needs --vault-token-file")
		case sf.vaultRole == "":
			return usagef("--signer vault needs --vault-role")
		case sf.vaultMount == "":
			return usagef("--vault-mount must not be empty")
		}
	}
	if dir != "" {
		return usagef("--dir is for --signer builtin; --signer %s keeps no CA files", sf.signer)
	}
	return nil
}

// authority builds the CA authority for the chosen signer; closeFn releases
// the signer's connections.
func (sf *signerFlags) authority(ctx context.Context, dir string, log *slog.Logger, opts ...ca.Option) (a *ca.Authority, closeFn func(), err error) {
	switch sf.signer {
	case ca.SignerStepCA:
		roots, err := readRoots("--stepca-root", sf.stepcaRoot)
		if err != nil {
			return nil, nil, err
		}
		key, err := stepca.LoadProvisionerKey(sf.stepcaKey, sf.stepcaPasswordFile)
		if err != nil {
			return nil, nil, fmt.Errorf("--stepca-provisioner-key: %w", err)
		}
		s, err := stepca.New(sf.stepcaURL, roots, sf.stepcaProvisioner, key, stepca.WithLogger(log))
		if err != nil {
			return nil, nil, usagef("--stepca-url: %v", err)
		}
		a, err := ca.NewFromSigner(s, opts...)
		if err != nil {
			s.Close()
			return nil, nil, fmt.Errorf("--stepca-root: %w", err)
		}
		return a, s.Close, nil
	case ca.SignerVault:
		vopts := []vault.Option{vault.WithLogger(log), vault.WithMount(sf.vaultMount)}
		if sf.vaultRoot != "" {
			roots, err := readRoots("--vault-root", sf.vaultRoot)
			if err != nil {
				return nil, nil, err
			}
			vopts = append(vopts, vault.WithRoots(roots...))
		}
		s, err := vault.New(ctx, sf.vaultAddr, sf.vaultTokenFile, sf.vaultRole, vopts...)
		if err != nil {
			return nil, nil, fmt.Errorf("--signer vault: %w", err)
		}
		a, err := ca.NewFromSigner(s, opts...)
		if err != nil {
			s.Close()
			return nil, nil, fmt.Errorf("--signer vault: %w", err)
		}
		return a, s.Close, nil
	}
	a, err = ca.Load(dir, opts...)
	return a, func() {}, err
}

func readRoots(flag, path string) ([]*x509.Certificate, error) {
	data, err := fileread.Read(path, fileread.MaxPEM)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", flag, err)
	}
	certs, err := tlsmgr.ParseCertificatesPEM(data)
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w", flag, path, err)
	}
	return certs, nil
}
