package gateway

import (
	"crypto"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"maps"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/meshproxy/meshproxy/internal/fileread"
	"github.com/meshproxy/meshproxy/metrics"
	"github.com/meshproxy/meshproxy/tlsmgr"
)

// maxCredentialFile bounds one certificate or key file.
const maxCredentialFile = fileread.MaxPEM

// Credential file names in --credentials-dir for a credentialName NAME.
const (
	certSuffix = ".crt"    // NAME.crt: the server certificate chain, leaf first
	keySuffix  = ".key"    // NAME.key: its private key
	caSuffix   = "-ca.crt" // NAME-ca.crt: CAs that sign accepted client certificates (MUTUAL)
)

// credential is one loaded credentialName.
type credential struct {
	name      string
	cert      *tls.Certificate // Leaf set
	clientCAs *x509.CertPool   // nil without NAME-ca.crt
	notAfter  time.Time
	sum       [sha256.Size]byte
}

// serverTLS is a server's tls.Config built for one credential.
type serverTLS struct {
	cred *credential
	cfg  *tls.Config
}

// tlsConfig returns the terminating config of s for cred, built once per
// credential so session tickets never outlive a certificate or CA change.
func (s *server) tlsConfig(cred *credential) *tls.Config {
	if c := s.tlsCache.Load(); c != nil && c.cred == cred {
		return c.cfg
	}
	cert := cred.cert
	cfg := &tls.Config{
		MinVersion: s.minVersion,
		MaxVersion: s.maxVersion,
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
			return cert, nil
		},
	}
	if s.mode == modeMutual {
		cfg.ClientAuth = tls.RequireAndVerifyClientCert
		cfg.ClientCAs = cred.clientCAs
	}
	s.tlsCache.Store(&serverTLS{cred: cred, cfg: cfg})
	return cfg
}

// credStore loads the credentials the config names from a directory and
// reloads them when their files change; a bad update keeps the last good
// credential.
type credStore struct {
	dir string
	log *slog.Logger
	cur atomic.Pointer[map[string]*credential]

	mu     sync.Mutex // serialises reloads; guards the fields below
	wanted map[string]bool
	failed map[string][sha256.Size]byte // content of the last failed load, reported once
	errs   map[string]string            // why a wanted credential is not (freshly) loaded
}

func newCredStore(dir string, log *slog.Logger) *credStore {
	s := &credStore{dir: dir, log: log, wanted: map[string]bool{}, failed: map[string][sha256.Size]byte{}, errs: map[string]string{}}
	s.cur.Store(&map[string]*credential{})
	return s
}

// get returns the loaded credential name, or nil.
func (s *credStore) get(name string) *credential { return (*s.cur.Load())[name] }

// setWanted sets the credential names to load and reloads.
func (s *credStore) setWanted(names map[string]bool) {
	s.mu.Lock()
	s.wanted = maps.Clone(names)
	s.mu.Unlock()
	s.reload()
}

// reload reads every wanted credential whose files changed.
func (s *credStore) reload() {
	s.mu.Lock()
	defer s.mu.Unlock()
	old := *s.cur.Load()
	next := make(map[string]*credential, len(s.wanted))
	for name := range s.wanted {
		prev := old[name]
		c, err := s.load(name, prev)
		if err != nil {
			if prev != nil {
				next[name] = prev
			}
			continue
		}
		next[name] = c
	}
	for name := range old {
		if !s.wanted[name] {
			metrics.GatewayCredentialExpiry.DeleteLabelValues(name)
			delete(s.failed, name)
			delete(s.errs, name)
		}
	}
	s.cur.Store(&next)
}

// load reads one credential; it returns prev when nothing changed. Failures
// are counted and logged once per distinct content. s.mu is held.
func (s *credStore) load(name string, prev *credential) (*credential, error) {
	base := filepath.Join(s.dir, name)
	var files [3][]byte
	var sum [sha256.Size]byte
	h := sha256.New()
	var err error
	for i, suffix := range []string{certSuffix, keySuffix, caSuffix} {
		files[i], err = readBounded(base + suffix)
		if err != nil && !(suffix == caSuffix && errors.Is(err, fs.ErrNotExist)) {
			break
		}
		err = nil
		fmt.Fprintf(h, "%d:", len(files[i]))
		h.Write(files[i])
	}
	if err == nil {
		h.Sum(sum[:0])
		if prev != nil && prev.sum == sum {
			return prev, nil
		}
	} else {
		sum = sha256.Sum256([]byte(err.Error()))
	}
	if f, ok := s.failed[name]; ok && f == sum {
		return nil, errors.New(s.errs[name])
	}
	var c *credential
	if err == nil {
		c, err = parseCredential(name, files[0], files[1], files[2])
	}
	if err != nil {
		err = fmt.Errorf("credential %s: %w", name, err)
		s.failed[name], s.errs[name] = sum, err.Error()
		metrics.ConfigReloads.WithLabelValues("credentials", "failure").Inc()
		if prev != nil {
			s.log.Error("credential reload failed; keeping the last good one", "credential", name, "dir", s.dir, "err", err)
		} else {
			s.log.Warn("credential not loaded; its servers refuse connections", "credential", name, "dir", s.dir, "err", err)
		}
		return nil, err
	}
	c.sum = sum
	delete(s.failed, name)
	delete(s.errs, name)
	metrics.ConfigReloads.WithLabelValues("credentials", "success").Inc()
	metrics.GatewayCredentialExpiry.WithLabelValues(name).Set(float64(c.notAfter.Unix()))
	attrs := []any{"credential", name, "subject", c.cert.Leaf.Subject.String(), "dns_names", c.cert.Leaf.DNSNames,
		"not_after", c.notAfter, "client_ca", c.clientCAs != nil}
	if time.Now().After(c.notAfter) {
		s.log.Warn("credential loaded but its certificate has expired", attrs...)
	} else {
		s.log.Info("credential loaded", attrs...)
	}
	return c, nil
}

// readBounded reads a regular file of at most maxCredentialFile bytes;
// anything but a regular file (a FIFO would block reloads) is refused.
func readBounded(path string) ([]byte, error) {
	return fileread.Read(path, maxCredentialFile)
}

// parseCredential checks a certificate chain, its key and the optional
// client CAs. Errors never contain key material.
func parseCredential(name string, certPEM, keyPEM, caPEM []byte) (*credential, error) {
	chain, err := tlsmgr.ParseCertificatesPEM(certPEM)
	if err != nil {
		return nil, fmt.Errorf("%s%s: %w", name, certSuffix, err)
	}
	key, err := tlsmgr.ParsePrivateKeyPEM(keyPEM)
	if err != nil {
		return nil, fmt.Errorf("%s%s: %w", name, keySuffix, err)
	}
	leaf := chain[0]
	if pub, ok := key.Public().(interface{ Equal(crypto.PublicKey) bool }); !ok || !pub.Equal(leaf.PublicKey) {
		// Also catches a chain written CA first: the key is the leaf's.
		return nil, fmt.Errorf("%s%s does not match the first certificate in %s%s (the server certificate must come first)", name, keySuffix, name, certSuffix)
	}
	c := &credential{name: name, notAfter: leaf.NotAfter, cert: &tls.Certificate{PrivateKey: key, Leaf: leaf}}
	for _, x := range chain {
		c.cert.Certificate = append(c.cert.Certificate, x.Raw)
	}
	if len(caPEM) > 0 {
		cas, err := tlsmgr.ParseCertificatesPEM(caPEM)
		if err != nil {
			return nil, fmt.Errorf("%s%s: %w", name, caSuffix, err)
		}
		c.clientCAs = x509.NewCertPool()
		for _, ca := range cas {
			c.clientCAs.AddCert(ca)
		}
	}
	return c, nil
}

// credentialView is one credential as GET /config shows it.
type credentialView struct {
	Name     string    `json:"name"`
	Loaded   bool      `json:"loaded"`
	Subject  string    `json:"subject,omitempty"`
	DNSNames []string  `json:"dns_names,omitempty"`
	NotAfter time.Time `json:"not_after,omitzero"`
	ClientCA bool      `json:"client_ca"`
	Error    string    `json:"error,omitempty"`
}

func (s *credStore) view() []credentialView {
	s.mu.Lock()
	names := slices.Sorted(maps.Keys(s.wanted))
	errs := maps.Clone(s.errs)
	s.mu.Unlock()
	out := []credentialView{}
	for _, name := range names {
		v := credentialView{Name: name, Error: errs[name]}
		if c := s.get(name); c != nil {
			v.Loaded, v.Subject, v.DNSNames, v.NotAfter, v.ClientCA = true, c.cert.Leaf.Subject.String(), c.cert.Leaf.DNSNames, c.notAfter.UTC(), c.clientCAs != nil
		}
		out = append(out, v)
	}
	return out
}
