package main

import (
	"context"
	"crypto/x509"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"strings"

	"github.com/spf13/pflag"

	"github.com/meshproxy/meshproxy/ca"
	"github.com/meshproxy/meshproxy/ca/authn"
	"github.com/meshproxy/meshproxy/ca/awspca"
	"github.com/meshproxy/meshproxy/ca/certmanager"
	"github.com/meshproxy/meshproxy/ca/googlecas"
	"github.com/meshproxy/meshproxy/ca/stepca"
	"github.com/meshproxy/meshproxy/ca/vault"
	"github.com/meshproxy/meshproxy/internal/fileread"
	"github.com/meshproxy/meshproxy/tlsmgr"
)

// Signers of --signer.
var signerNames = []string{ca.SignerBuiltin, ca.SignerStepCA, ca.SignerVault, ca.SignerAWSPCA, ca.SignerGoogleCAS, ca.SignerCertManager}

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
  awspca    an AWS Private CA: IssueCertificate on --awspca-ca-arn with the
            API-passthrough template (the SPIFFE ID as URI SAN), then
            GetCertificate until issued; throttling and pending issuance are
            retried until the request's deadline. Credentials come from the
            AWS SDK's default chain (AWS_* variables, shared files, IRSA web
            identity, ECS/EC2 roles); the region from the ARN or
            --awspca-region. The trust bundle is --awspca-root, or else the
            self-signed certificates of the CA's chain, read at start.
  googlecas a Google Certificate Authority Service pool: CreateCertificate in
            --googlecas-pool (on --googlecas-ca if set, with
            --googlecas-template if set) describing the certificate: the
            CSR's public key, the SPIFFE ID as URI SAN, the request's
            lifetime. Quota and unavailability are retried until the
            request's deadline. Credentials are Application Default
            Credentials. The trust bundle is --googlecas-root, or else the
            roots of the pool's CA certificates, read at start.
  certmanager
            cert-manager, as istio-csr does: a CertificateRequest with the
            CSR, duration and usages for --certmanager-issuer (of
            --certmanager-issuer-kind and -group) in --certmanager-namespace,
            through the API server of --certmanager-kubeconfig (default:
            in-cluster config); approved by meshproxy with
            --certmanager-approve, else by cert-manager's approver; deleted
            once Ready. cert-manager signs the CSR as it is, so sidecars must
            name their SPIFFE ID in it (run --ca-spiffe-id); other CSRs are
            InvalidArgument. The trust bundle is --certmanager-root.

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

	awsARN, awsRegion, awsEndpoint, awsTemplate, awsRoot string

	casPool, casCA, casTemplate, casEndpoint, casRoot string

	cmKubeconfig, cmNamespace, cmIssuer, cmIssuerKind, cmIssuerGroup, cmRoot string
	cmApprove                                                                bool
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
	f.StringVar(&sf.awsARN, "awspca-ca-arn", "", "ARN of the AWS Private CA for --signer awspca (arn:aws:acm-pca:REGION:ACCOUNT:certificate-authority/ID)")
	f.StringVar(&sf.awsRegion, "awspca-region", "", "AWS region for --signer awspca (default: the CA ARN's)")
	f.StringVar(&sf.awsEndpoint, "awspca-endpoint", "", "ACM PCA endpoint URL for --signer awspca (default: the region's; e.g. a VPC endpoint)")
	f.StringVar(&sf.awsTemplate, "awspca-template-arn", awspca.DefaultTemplateARN, "certificate template for --signer awspca; it must pass API-passthrough SANs through")
	f.StringVar(&sf.awsRoot, "awspca-root", "", "the private CA's root certificate(s), PEM (default: the self-signed certificates of its chain)")
	f.StringVar(&sf.casPool, "googlecas-pool", "", "CA pool for --signer googlecas: projects/PROJECT/locations/LOCATION/caPools/POOL")
	f.StringVar(&sf.casCA, "googlecas-ca", "", "ID of the CA in the pool that issues, for --signer googlecas (default: CAS chooses)")
	f.StringVar(&sf.casTemplate, "googlecas-template", "", "certificate template for --signer googlecas: projects/PROJECT/locations/LOCATION/certificateTemplates/TEMPLATE")
	f.StringVar(&sf.casEndpoint, "googlecas-endpoint", "", "CAS endpoint HOST:PORT for --signer googlecas (default: Google's; e.g. a Private Service Connect endpoint)")
	f.StringVar(&sf.casRoot, "googlecas-root", "", "the pool's root certificate(s), PEM (default: the roots of the pool's CA certificates)")
	f.StringVar(&sf.cmKubeconfig, "certmanager-kubeconfig", "", "kubeconfig of the API server for --signer certmanager (default: in-cluster config)")
	f.StringVar(&sf.cmNamespace, "certmanager-namespace", "istio-system", "namespace of the CertificateRequests for --signer certmanager")
	f.StringVar(&sf.cmIssuer, "certmanager-issuer", "", "name of the cert-manager issuer that signs, for --signer certmanager")
	f.StringVar(&sf.cmIssuerKind, "certmanager-issuer-kind", certmanager.KindIssuer, "kind of --certmanager-issuer: Issuer, ClusterIssuer or an external issuer's kind")
	f.StringVar(&sf.cmIssuerGroup, "certmanager-issuer-group", certmanager.Group, "API group of --certmanager-issuer")
	f.StringVar(&sf.cmRoot, "certmanager-root", "", "the issuer's root certificate(s), PEM: the trust bundle, for --signer certmanager")
	f.BoolVar(&sf.cmApprove, "certmanager-approve", false, "meshproxy approves its own CertificateRequests (else cert-manager's approver must)")
}

// signerOnlyFlags lists, for each external signer, its flags that are set
// (changed from their default): they are an error with another signer.
func (sf *signerFlags) signerOnlyFlags() map[string][]string {
	set := func(pairs ...string) []string {
		var names []string
		for i := 0; i < len(pairs); i += 3 {
			if pairs[i+1] != pairs[i+2] {
				names = append(names, "--"+pairs[i])
			}
		}
		return names
	}
	return map[string][]string{
		ca.SignerStepCA: set("stepca-url", sf.stepcaURL, "", "stepca-root", sf.stepcaRoot, "", "stepca-provisioner", sf.stepcaProvisioner, "",
			"stepca-provisioner-key", sf.stepcaKey, "", "stepca-provisioner-password-file", sf.stepcaPasswordFile, ""),
		ca.SignerVault: set("vault-addr", sf.vaultAddr, "", "vault-token-file", sf.vaultTokenFile, "", "vault-role", sf.vaultRole, "",
			"vault-root", sf.vaultRoot, "", "vault-mount", sf.vaultMount, vault.DefaultMount),
		ca.SignerAWSPCA: set("awspca-ca-arn", sf.awsARN, "", "awspca-region", sf.awsRegion, "", "awspca-endpoint", sf.awsEndpoint, "",
			"awspca-template-arn", sf.awsTemplate, awspca.DefaultTemplateARN, "awspca-root", sf.awsRoot, ""),
		ca.SignerGoogleCAS: set("googlecas-pool", sf.casPool, "", "googlecas-ca", sf.casCA, "", "googlecas-template", sf.casTemplate, "",
			"googlecas-endpoint", sf.casEndpoint, "", "googlecas-root", sf.casRoot, ""),
		ca.SignerCertManager: set("certmanager-kubeconfig", sf.cmKubeconfig, "", "certmanager-namespace", sf.cmNamespace, "istio-system",
			"certmanager-issuer", sf.cmIssuer, "", "certmanager-issuer-kind", sf.cmIssuerKind, certmanager.KindIssuer,
			"certmanager-issuer-group", sf.cmIssuerGroup, certmanager.Group, "certmanager-root", sf.cmRoot, "",
			"certmanager-approve", strconv.FormatBool(sf.cmApprove), "false"),
	}
}

// validate reports flag combinations that cannot work, naming the flag.
func (sf *signerFlags) validate(dir string) error {
	if !slices.Contains(signerNames, sf.signer) {
		return usagef("--signer: unknown signer %q (want %s)", sf.signer, strings.Join(signerNames, ", "))
	}
	for _, name := range signerNames {
		if flags := sf.signerOnlyFlags()[name]; name != sf.signer && len(flags) > 0 {
			return usagef("%s set but --signer is %s, not %s", strings.Join(flags, ", "), sf.signer, name)
		}
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
	case ca.SignerAWSPCA:
		switch {
		case sf.awsARN == "":
			return usagef("--signer awspca needs --awspca-ca-arn")
		case sf.awsTemplate == "":
			return usagef("--awspca-template-arn must not be empty")
		}
	case ca.SignerGoogleCAS:
		if sf.casPool == "" {
			return usagef("--signer googlecas needs --googlecas-pool")
		}
		if err := googlecas.CheckPoolName(sf.casPool); err != nil {
			return usagef("--googlecas-pool: %v", err)
		}
	case ca.SignerCertManager:
		switch {
		case sf.cmIssuer == "":
			return usagef("--signer certmanager needs --certmanager-issuer")
		case sf.cmRoot == "":
			return usagef("--signer certmanager needs --certmanager-root")
		case sf.cmNamespace == "":
			return usagef("--certmanager-namespace must not be empty")
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
	case ca.SignerAWSPCA:
		aopts := []awspca.Option{awspca.WithLogger(log), awspca.WithTemplateARN(sf.awsTemplate)}
		if sf.awsRegion != "" {
			aopts = append(aopts, awspca.WithRegion(sf.awsRegion))
		}
		if sf.awsEndpoint != "" {
			aopts = append(aopts, awspca.WithEndpoint(sf.awsEndpoint))
		}
		if sf.awsRoot != "" {
			roots, err := readRoots("--awspca-root", sf.awsRoot)
			if err != nil {
				return nil, nil, err
			}
			aopts = append(aopts, awspca.WithRoots(roots...))
		}
		s, err := awspca.New(ctx, sf.awsARN, aopts...)
		if err != nil {
			return nil, nil, fmt.Errorf("--signer awspca: %w", err)
		}
		a, err := ca.NewFromSigner(s, opts...)
		if err != nil {
			return nil, nil, fmt.Errorf("--signer awspca: %w", err)
		}
		return a, func() {}, nil
	case ca.SignerGoogleCAS:
		gopts := []googlecas.Option{googlecas.WithLogger(log), googlecas.WithCertificateAuthority(sf.casCA), googlecas.WithTemplate(sf.casTemplate)}
		if sf.casEndpoint != "" {
			gopts = append(gopts, googlecas.WithEndpoint(sf.casEndpoint))
		}
		if sf.casRoot != "" {
			roots, err := readRoots("--googlecas-root", sf.casRoot)
			if err != nil {
				return nil, nil, err
			}
			gopts = append(gopts, googlecas.WithRoots(roots...))
		}
		s, err := googlecas.New(ctx, sf.casPool, gopts...)
		if err != nil {
			return nil, nil, fmt.Errorf("--signer googlecas: %w", err)
		}
		a, err := ca.NewFromSigner(s, opts...)
		if err != nil {
			s.Close()
			return nil, nil, fmt.Errorf("--signer googlecas: %w", err)
		}
		return a, s.Close, nil
	case ca.SignerCertManager:
		roots, err := readRoots("--certmanager-root", sf.cmRoot)
		if err != nil {
			return nil, nil, err
		}
		var api *authn.KubeAPI
		if sf.cmKubeconfig != "" {
			api, err = authn.KubeconfigAPI(sf.cmKubeconfig)
		} else {
			api, err = authn.InClusterAPI()
		}
		if err != nil {
			return nil, nil, fmt.Errorf("--certmanager-kubeconfig: %w", err)
		}
		issuer := certmanager.IssuerRef{Name: sf.cmIssuer, Kind: sf.cmIssuerKind, Group: sf.cmIssuerGroup}
		s, err := certmanager.New(api, sf.cmNamespace, issuer, roots, certmanager.WithLogger(log), certmanager.WithApprove(sf.cmApprove))
		if err != nil {
			return nil, nil, usagef("--signer certmanager: %v", err)
		}
		a, err := ca.NewFromSigner(s, opts...)
		if err != nil {
			s.Close()
			return nil, nil, fmt.Errorf("--certmanager-root: %w", err)
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
