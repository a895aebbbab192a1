package harness

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"time"
)

// SPIFFE IDs of the two workloads of the comparison.
const (
	TrustDomain = "cluster.local"
	ClientID    = "spiffe://cluster.local/ns/bench/sa/client"
	ServerID    = "spiffe://cluster.local/ns/bench/sa/server"
)

// PKI is the set of PEM files every peer of a run uses: one root, one
// intermediate, and a client and a server leaf issued by the intermediate.
type PKI struct {
	Dir  string
	Root string // root certificate: the trust bundle / CA file
	// Client and Server are the workloads' files.
	Client, Server LeafFiles
}

// LeafFiles are one leaf's files in the layouts the peers want.
type LeafFiles struct {
	Chain    string // leaf then intermediate (meshproxy --cert-file, stunnel cert)
	Key      string // PKCS#8 private key (meshproxy --key-file, stunnel key)
	Combined string // chain then key (HAProxy crt)
}

// NewPKI generates the PKI and writes it to dir. Files are mode 0600.
func NewPKI(dir string) (*PKI, error) {
	now := time.Now()
	tdURL := &url.URL{Scheme: "spiffe", Host: TrustDomain}
	rootKey, err := newKey()
	if err != nil {
		return nil, err
	}
	root, err := sign(&x509.Certificate{
		Subject:               pkix.Name{Organization: []string{"meshproxy bench"}, CommonName: "bench root"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(48 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		URIs:                  []*url.URL{tdURL},
	}, nil, rootKey, rootKey)
	if err != nil {
		return nil, fmt.Errorf("root: %w", err)
	}
	intKey, err := newKey()
	if err != nil {
		return nil, err
	}
	inter, err := sign(&x509.Certificate{
		Subject:               pkix.Name{Organization: []string{"meshproxy bench"}, CommonName: "bench intermediate"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(47 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		URIs:                  []*url.URL{tdURL},
	}, root, intKey, rootKey)
	if err != nil {
		return nil, fmt.Errorf("intermediate: %w", err)
	}
	p := &PKI{Dir: dir, Root: filepath.Join(dir, "root.pem")}
	if err := os.WriteFile(p.Root, pemCerts(root), 0o600); err != nil {
		return nil, fmt.Errorf("write root: %w", err)
	}
	// The server leaf also names 127.0.0.1, where every server proxy
	// listens: ghostunnel's client checks the host it dials as well as the
	// SPIFFE ID (--verify-uri). SPIFFE allows SANs beside the one URI.
	for _, l := range []struct {
		name, id string
		ips      []net.IP
		out      *LeafFiles
	}{{"client", ClientID, nil, &p.Client}, {"server", ServerID, []net.IP{net.IPv4(127, 0, 0, 1)}, &p.Server}} {
		if *l.out, err = writeLeaf(dir, l.name, l.id, l.ips, now, inter, intKey); err != nil {
			return nil, fmt.Errorf("%s leaf: %w", l.name, err)
		}
	}
	return p, nil
}

func writeLeaf(dir, name, id string, ips []net.IP, now time.Time, inter *x509.Certificate, intKey crypto.Signer) (LeafFiles, error) {
	u, err := url.Parse(id)
	if err != nil {
		return LeafFiles{}, fmt.Errorf("spiffe id %q: %w", id, err)
	}
	key, err := newKey()
	if err != nil {
		return LeafFiles{}, err
	}
	leaf, err := sign(&x509.Certificate{
		Subject:               pkix.Name{Organization: []string{"meshproxy bench"}},
		NotBefore:             now.Add(-2 * time.Minute),
		NotAfter:              now.Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
		URIs:                  []*url.URL{u},
		IPAddresses:           ips,
	}, inter, key, intKey)
	if err != nil {
		return LeafFiles{}, err
	}
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return LeafFiles{}, fmt.Errorf("marshal key: %w", err)
	}
	chain := pemCerts(leaf, inter)
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
	f := LeafFiles{
		Chain:    filepath.Join(dir, name+"-chain.pem"),
		Key:      filepath.Join(dir, name+"-key.pem"),
		Combined: filepath.Join(dir, name+"-combined.pem"),
	}
	for _, w := range []struct {
		path string
		data []byte
	}{{f.Chain, chain}, {f.Key, keyPEM}, {f.Combined, append(append([]byte(nil), chain...), keyPEM...)}} {
		if err := os.WriteFile(w.path, w.data, 0o600); err != nil {
			return LeafFiles{}, fmt.Errorf("write %s: %w", w.path, err)
		}
	}
	return f, nil
}

func newKey() (*ecdsa.PrivateKey, error) {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate P-256 key: %w", err)
	}
	return k, nil
}

func sign(tmpl, parent *x509.Certificate, key *ecdsa.PrivateKey, signer crypto.Signer) (*x509.Certificate, error) {
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
	if err != nil {
		return nil, fmt.Errorf("serial: %w", err)
	}
	tmpl.SerialNumber = serial
	if parent == nil {
		parent = tmpl
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, key.Public(), signer)
	if err != nil {
		return nil, fmt.Errorf("create certificate: %w", err)
	}
	return x509.ParseCertificate(der)
}

func pemCerts(certs ...*x509.Certificate) []byte {
	var out []byte
	for _, c := range certs {
		out = append(out, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})...)
	}
	return out
}
