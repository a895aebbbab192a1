package stepcatest

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"

	"github.com/meshproxy/meshproxy/ca/stepca"
	"github.com/meshproxy/meshproxy/internal/e2eutil"
	"github.com/meshproxy/meshproxy/internal/testpki"
	"github.com/meshproxy/meshproxy/internal/testtools"
)

// BinEnv names a prebuilt step-ca binary that replaces the build.
const BinEnv = "MESHPROXY_STEPCA_BIN"

// ProvisionerName is the JWK provisioner Start configures.
const ProvisionerName = "meshproxy"

// testIterations is the PBKDF2 count of the provisioner key Start writes.
const testIterations = 4096

// waitLimit bounds every wait on step-ca; generous for a loaded machine.
const waitLimit = 90 * time.Second

var (
	buildOnce sync.Once
	binPath   string
	binErr    error
)

// Binary returns the path of the step-ca binary: $MESHPROXY_STEPCA_BIN, or
// the test tools' cache, built there by scripts/test-tools.sh on first use
// when missing or stale (package internal/testtools).
func Binary(t testing.TB) string {
	t.Helper()
	buildOnce.Do(func() {
		binPath, binErr = binary()
	})
	if binErr != nil {
		t.Fatalf("step-ca binary: %v", binErr)
	}
	return binPath
}

func binary() (string, error) {
	if p := os.Getenv(BinEnv); p != "" {
		if err := executable(p); err != nil {
			return "", fmt.Errorf("%s=%s: %w", BinEnv, p, err)
		}
		return p, nil
	}
	dir, err := testtools.Dir()
	if err != nil {
		return "", err
	}
	bin := filepath.Join(dir, "step-ca")
	return bin, executable(bin)
}

func executable(path string) error {
	fi, err := os.Stat(path)
	if err != nil {
		return err
	}
	if fi.Mode()&0o111 == 0 {
		return fmt.Errorf("%s is not executable", path)
	}
	return nil
}

// Server is a running step-ca.
type Server struct {
	URL          string // https://127.0.0.1:PORT
	Dir          string // config, certificates and log
	RootFile     string // the root, PEM
	KeyFile      string // the provisioner's private key, an encrypted compact JWE
	PasswordFile string // its password
	Provisioner  string
	Key          *jose.JSONWebKey // the provisioner's private key
	PKI          *testpki.CA      // root and intermediate step-ca signs with
	LogFile      string

	stopOnce sync.Once
	stop     func()
}

// Stop stops step-ca now (it is stopped when the test ends anyway).
func (s *Server) Stop(t *testing.T) {
	t.Helper()
	s.stopOnce.Do(s.stop)
}

// Option configures Start.
type Option func(*config)

type config struct {
	maxTTL time.Duration
}

// WithMaxTTL sets the provisioner's maxTLSCertDuration (default 2160h).
func WithMaxTTL(d time.Duration) Option { return func(c *config) { c.maxTTL = d } }

// Start initializes a CA for trust domain td in a temporary directory and
// runs step-ca on loopback until the test ends. Its root and intermediate
// live a week and carry spiffe://td as URI SAN.
func Start(t *testing.T, td string, opts ...Option) *Server {
	t.Helper()
	c := config{maxTTL: 2160 * time.Hour}
	for _, o := range opts {
		o(&c)
	}
	bin := Binary(t)
	dir := t.TempDir()
	pki := testpki.NewWithTTL(t, td, 7*24*time.Hour)
	s := &Server{
		Dir:          dir,
		RootFile:     filepath.Join(dir, "root_ca.crt"),
		KeyFile:      filepath.Join(dir, "provisioner.jwe"),
		PasswordFile: filepath.Join(dir, "provisioner.password"),
		Provisioner:  ProvisionerName,
		PKI:          pki,
		LogFile:      filepath.Join(dir, "step-ca.log"),
	}
	writeFile(t, s.RootFile, pemCert(pki.Root))
	writeFile(t, filepath.Join(dir, "intermediate_ca.crt"), pemCert(pki.Intermediate))
	keyDER, err := x509.MarshalECPrivateKey(pki.IntermediateKey)
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(dir, "intermediate_ca_key"), pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}))

	// The provisioner: a P-256 JWK, its public half in ca.json, the private
	// half encrypted with a password as step keeps it.
	priv, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	s.Key = &jose.JSONWebKey{Key: priv, Algorithm: string(jose.ES256), Use: "sig"}
	tp, err := s.Key.Thumbprint(crypto.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	s.Key.KeyID = base64.RawURLEncoding.EncodeToString(tp)
	password := []byte(hex.EncodeToString(tp[:8]))
	enc, err := EncryptKey(s.Key, password, testIterations)
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, s.KeyFile, []byte(enc+"\n"))
	writeFile(t, s.PasswordFile, append(password, '\n'))
	pub := s.Key.Public()

	var lastErr error
	for range 3 { // a port taken between probe and bind: try another
		port := freePort(t)
		s.URL = fmt.Sprintf("https://127.0.0.1:%d", port)
		cfg := map[string]any{
			"root":     s.RootFile,
			"crt":      filepath.Join(dir, "intermediate_ca.crt"),
			"key":      filepath.Join(dir, "intermediate_ca_key"),
			"address":  fmt.Sprintf("127.0.0.1:%d", port),
			"dnsNames": []string{"127.0.0.1", "localhost"},
			"logger":   map[string]any{"format": "text"},
			"authority": map[string]any{
				"provisioners": []any{map[string]any{
					"type":         "JWK",
					"name":         ProvisionerName,
					"key":          pub,
					"encryptedKey": enc,
					"claims": map[string]any{
						"minTLSCertDuration":     "1m",
						"defaultTLSCertDuration": "24h",
						"maxTLSCertDuration":     c.maxTTL.String(),
					},
					"options": map[string]any{"x509": map[string]any{"template": stepca.TemplateSPIFFE}},
				}},
			},
		}
		data, err := json.MarshalIndent(cfg, "", "  ")
		if err != nil {
			t.Fatal(err)
		}
		cfgPath := filepath.Join(dir, "ca.json")
		writeFile(t, cfgPath, data)
		if lastErr = s.run(t, bin, cfgPath); lastErr == nil {
			return s
		}
	}
	t.Fatalf("step-ca did not start: %v\nlog:\n%s", lastErr, tail(s.LogFile, 40))
	return nil
}

// run starts step-ca and waits until /health answers; the process is
// stopped when the test ends.
func (s *Server) run(t *testing.T, bin, cfgPath string) error {
	t.Helper()
	logFile, err := os.Create(s.LogFile)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, cfgPath)
	cmd.Dir = s.Dir
	cmd.Env = append(e2eutil.EnvWithout("STEPPATH=", "HOME="), "STEPPATH="+s.Dir, "HOME="+s.Dir)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logFile.Close()
		t.Fatalf("start step-ca: %v", err)
	}
	exited := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		close(exited)
	}()
	stop := func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(15 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
		}
		logFile.Close()
	}
	if err := s.waitHealthy(exited); err != nil {
		stop()
		return err
	}
	s.stop = stop
	t.Cleanup(func() {
		s.stopOnce.Do(stop)
		if t.Failed() {
			t.Logf("step-ca log (tail):\n%s", tail(s.LogFile, 60))
		}
	})
	return nil
}

func (s *Server) waitHealthy(exited <-chan struct{}) error {
	pool := x509.NewCertPool()
	pool.AddCert(s.PKI.Root)
	client := &http.Client{
		Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}},
		Timeout:   5 * time.Second,
	}
	defer client.CloseIdleConnections()
	deadline := time.Now().Add(waitLimit)
	var lastErr error
	for time.Now().Before(deadline) {
		select {
		case <-exited:
			return fmt.Errorf("step-ca exited: %s", tail(s.LogFile, 20))
		default:
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, s.URL+"/health", nil)
		resp, err := client.Do(req)
		if err == nil {
			body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				cancel()
				return nil
			}
			err = fmt.Errorf("/health: %d %s", resp.StatusCode, body)
		}
		cancel()
		lastErr = err
		time.Sleep(200 * time.Millisecond)
	}
	return fmt.Errorf("step-ca not healthy after %s: %v", waitLimit, lastErr)
}

// EncryptKey encrypts key with password as step does (PBES2-HS256+A128KW,
// A256GCM, content type jwk+json) and returns the compact JWE, the form of
// a provisioner's "encryptedKey" in ca.json. step uses 600000 PBKDF2
// iterations; tests use fewer, since the race detector makes each one slow.
func EncryptKey(key *jose.JSONWebKey, password []byte, iterations int) (string, error) {
	plain, err := json.Marshal(key)
	if err != nil {
		return "", err
	}
	enc, err := jose.NewEncrypter(jose.A256GCM,
		jose.Recipient{Algorithm: jose.PBES2_HS256_A128KW, Key: password, PBES2Count: iterations},
		(&jose.EncrypterOptions{}).WithContentType("jwk+json"))
	if err != nil {
		return "", err
	}
	obj, err := enc.Encrypt(plain)
	if err != nil {
		return "", err
	}
	return obj.CompactSerialize()
}

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func writeFile(t *testing.T, path string, data []byte) {
	t.Helper()
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
}

func pemCert(c *x509.Certificate) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
}

// tail returns the last n lines of the file at path.
func tail(path string, n int) string {
	data, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("(%v)", err)
	}
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
