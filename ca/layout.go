package ca

import (
	"crypto"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"net/url"
	"os"
	"path/filepath"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshproxy/meshproxy/internal/fileread"
)

// File names of Istio's plugged-in CA layout (the cacerts secret).
const (
	RootCertFile  = "root-cert.pem"  // trust bundle: one or more roots
	CACertFile    = "ca-cert.pem"    // signing certificate
	CAKeyFile     = "ca-key.pem"     // signing key, mode 0600
	CertChainFile = "cert-chain.pem" // signing certificate up to the root
)

// Defaults of Init.
const (
	DefaultRootTTL = 87600 * time.Hour // 10 years
	DefaultCATTL   = 8760 * time.Hour  // 1 year
)

// InitOption configures Init.
type InitOption func(*initOptions)

type initOptions struct {
	rootTTL time.Duration
	caTTL   time.Duration
	keyType KeyType
	force   bool
	now     func() time.Time
}

// WithRootTTL sets the root certificate's lifetime (default DefaultRootTTL).
func WithRootTTL(d time.Duration) InitOption { return func(o *initOptions) { o.rootTTL = d } }

// WithCATTL sets the signing certificate's lifetime (default DefaultCATTL).
func WithCATTL(d time.Duration) InitOption { return func(o *initOptions) { o.caTTL = d } }

// WithKeyType sets the algorithm of the generated keys (default ecdsa-p256).
func WithKeyType(k KeyType) InitOption { return func(o *initOptions) { o.keyType = k } }

// WithForce lets Init replace an existing CA in the directory.
func WithForce(force bool) InitOption { return func(o *initOptions) { o.force = force } }

// WithInitClock replaces time.Now, for tests.
func WithInitClock(now func() time.Time) InitOption { return func(o *initOptions) { o.now = now } }

// layoutFiles are the files Init writes, in the order it renames them into
// place (the key last, so a partly written CA is never loadable).
var layoutFiles = []string{RootCertFile, CACertFile, CertChainFile, CAKeyFile}

// Init creates a new self-signed root and a signing certificate under it for
// trust domain td and writes them to dir in Istio's plugged-in layout. Both
// carry td's SPIFFE ID as URI SAN. The root key is not kept. Init refuses
// (ErrExists) if any of the layout's files exists, unless WithForce.
func Init(dir string, td spiffeid.TrustDomain, opts ...InitOption) error {
	o := initOptions{rootTTL: DefaultRootTTL, caTTL: DefaultCATTL, keyType: KeyECDSAP256, now: time.Now}
	for _, opt := range opts {
		opt(&o)
	}
	if td.IsZero() {
		return errors.New("init ca: empty trust domain")
	}
	if o.rootTTL <= 0 || o.caTTL <= 0 {
		return fmt.Errorf("init ca: root ttl %s and ca ttl %s must be positive", o.rootTTL, o.caTTL)
	}
	if o.caTTL > o.rootTTL {
		return fmt.Errorf("init ca: ca ttl %s exceeds root ttl %s", o.caTTL, o.rootTTL)
	}
	if !o.force {
		for _, name := range layoutFiles {
			path := filepath.Join(dir, name)
			if _, err := os.Lstat(path); err == nil {
				return fmt.Errorf("init ca: %w: %s exists (use force to replace it)", ErrExists, path)
			} else if !errors.Is(err, fs.ErrNotExist) {
				return fmt.Errorf("init ca: %w", err)
			}
		}
	}

	now := o.now()
	rootKey, err := o.keyType.generate()
	if err != nil {
		return fmt.Errorf("init ca: generate root key: %w", err)
	}
	root, err := createCA(&x509.Certificate{
		Subject:   pkix.Name{Organization: []string{td.Name()}, CommonName: "meshproxy root CA"},
		NotBefore: now.Add(-ClockSkew),
		NotAfter:  now.Add(o.rootTTL),
		URIs:      []*url.URL{td.ID().URL()},
	}, nil, rootKey, rootKey)
	if err != nil {
		return fmt.Errorf("init ca: root: %w", err)
	}
	caKey, err := o.keyType.generate()
	if err != nil {
		return fmt.Errorf("init ca: generate signing key: %w", err)
	}
	caCert, err := createCA(&x509.Certificate{
		Subject:        pkix.Name{Organization: []string{td.Name()}, CommonName: "meshproxy intermediate CA"},
		NotBefore:      now.Add(-ClockSkew),
		NotAfter:       now.Add(o.caTTL),
		URIs:           []*url.URL{td.ID().URL()},
		MaxPathLenZero: true, // signs workload certificates only
	}, root, caKey, rootKey)
	if err != nil {
		return fmt.Errorf("init ca: signing certificate: %w", err)
	}
	keyPEM, err := marshalKeyPEM(caKey)
	if err != nil {
		return fmt.Errorf("init ca: %w", err)
	}
	files := map[string][]byte{
		RootCertFile:  certsPEM(root),
		CACertFile:    certsPEM(caCert),
		CertChainFile: certsPEM(caCert, root),
		CAKeyFile:     keyPEM,
	}
	if err := writeLayout(dir, files); err != nil {
		return fmt.Errorf("init ca in %s: %w", dir, err)
	}
	return nil
}

func createCA(tmpl, parent *x509.Certificate, key, parentKey crypto.Signer) (*x509.Certificate, error) {
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
	if err != nil {
		return nil, fmt.Errorf("serial: %w", err)
	}
	tmpl.SerialNumber = serial
	tmpl.IsCA = true
	tmpl.BasicConstraintsValid = true
	tmpl.KeyUsage = x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature
	if parent == nil {
		parent = tmpl
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, key.Public(), parentKey)
	if err != nil {
		return nil, err
	}
	return x509.ParseCertificate(der)
}

// writeLayout writes every file to a temporary name first and renames them
// into place only when all are on disk. The key is created 0600 from the
// start; it is never readable by others, not even briefly.
func writeLayout(dir string, files map[string][]byte) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	tmps := map[string]string{}
	defer func() {
		for _, tmp := range tmps {
			_ = os.Remove(tmp)
		}
	}()
	for _, name := range layoutFiles {
		mode := os.FileMode(0o644)
		if name == CAKeyFile {
			mode = 0o600
		}
		tmp, err := writeTemp(dir, name, files[name], mode)
		if err != nil {
			return err
		}
		tmps[name] = tmp
	}
	for _, name := range layoutFiles {
		if err := os.Rename(tmps[name], filepath.Join(dir, name)); err != nil {
			return err
		}
		delete(tmps, name)
	}
	return nil
}

func writeTemp(dir, name string, data []byte, mode os.FileMode) (string, error) {
	f, err := os.CreateTemp(dir, "."+name+".tmp-*") // created 0600
	if err != nil {
		return "", err
	}
	tmp := f.Name()
	err = f.Chmod(mode)
	if err == nil {
		_, err = f.Write(data)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		_ = os.Remove(tmp)
		return "", fmt.Errorf("write %s: %w", name, err)
	}
	return tmp, nil
}

// Load reads a CA directory in Istio's plugged-in layout, as written by Init
// or by other tooling (openssl, Istio's Makefiles, cert-manager): keys in
// PKCS#1, PKCS#8 or SEC1 PEM; root-cert.pem with one or more roots;
// cert-chain.pem (optional) with or without the root. See New for the
// checks.
func Load(dir string, opts ...Option) (*Authority, error) {
	read := func(name string) ([]byte, error) {
		data, err := fileread.Read(filepath.Join(dir, name), fileread.MaxPEM)
		if err != nil {
			return nil, fmt.Errorf("load ca: %w: %w", ErrInvalidCA, err)
		}
		return data, nil
	}
	data, err := read(RootCertFile)
	if err != nil {
		return nil, err
	}
	roots, err := parseCertsPEM(data)
	if err != nil {
		return nil, fmt.Errorf("load ca: %w: %s: %w", ErrInvalidCA, filepath.Join(dir, RootCertFile), err)
	}
	if data, err = read(CACertFile); err != nil {
		return nil, err
	}
	chain, err := parseCertsPEM(data)
	if err != nil {
		return nil, fmt.Errorf("load ca: %w: %s: %w", ErrInvalidCA, filepath.Join(dir, CACertFile), err)
	}
	if data, err = fileread.Read(filepath.Join(dir, CertChainFile), fileread.MaxPEM); err == nil {
		more, err := parseCertsPEM(data)
		if err != nil {
			return nil, fmt.Errorf("load ca: %w: %s: %w", ErrInvalidCA, filepath.Join(dir, CertChainFile), err)
		}
		chain = append(chain, more...)
	} else if !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("load ca: %w", err)
	}
	if data, err = read(CAKeyFile); err != nil {
		return nil, err
	}
	key, err := parseKeyPEM(data)
	if err != nil {
		return nil, fmt.Errorf("load ca: %w: %s: %w", ErrInvalidCA, filepath.Join(dir, CAKeyFile), err)
	}
	a, err := New(key, chain, roots, opts...)
	if err != nil {
		return nil, fmt.Errorf("load ca from %s: %w", dir, err)
	}
	return a, nil
}
