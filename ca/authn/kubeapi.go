package authn

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"sigs.k8s.io/yaml"

	"github.com/meshproxy/meshproxy/internal/fileread"
)

// KubeAPI is a connection to a Kubernetes API server: its URL, a TLS client
// trusting the cluster CA, and the CA's own credentials (a bearer token
// re-read from its file on every request, or a client certificate).
type KubeAPI struct {
	server    *url.URL
	client    *http.Client
	token     string // static token from a kubeconfig
	tokenFile string // re-read per request: projected tokens rotate
}

// In-cluster defaults, as documented for Kubernetes service accounts.
const serviceAccountDir = "/var/run/secrets/kubernetes.io/serviceaccount"

// InClusterAPI connects to the API server of the cluster this process runs
// in: KUBERNETES_SERVICE_HOST/PORT and the service account token and CA
// under /var/run/secrets/kubernetes.io/serviceaccount.
func InClusterAPI() (*KubeAPI, error) {
	return inClusterAPI(os.Getenv, serviceAccountDir)
}

func inClusterAPI(getenv func(string) string, saDir string) (*KubeAPI, error) {
	host, port := getenv("KUBERNETES_SERVICE_HOST"), getenv("KUBERNETES_SERVICE_PORT")
	if host == "" || port == "" {
		return nil, errors.New("in-cluster kubernetes config: KUBERNETES_SERVICE_HOST/PORT not set (not running in a pod? use a kubeconfig)")
	}
	server := "https://" + net.JoinHostPort(host, port)
	caPEM, err := fileread.Read(filepath.Join(saDir, "ca.crt"), fileread.MaxPEM)
	if err != nil {
		return nil, fmt.Errorf("in-cluster kubernetes config: %w", err)
	}
	tokenFile := filepath.Join(saDir, "token")
	if _, err := os.Stat(tokenFile); err != nil {
		return nil, fmt.Errorf("in-cluster kubernetes config: %w", err)
	}
	return newKubeAPI(server, caPEM, nil, "", tokenFile)
}

// kubeconfig is the subset of the kubeconfig file format meshproxy reads.
type kubeconfig struct {
	CurrentContext string `json:"current-context"`
	Contexts       []struct {
		Name    string `json:"name"`
		Context struct {
			Cluster string `json:"cluster"`
			User    string `json:"user"`
		} `json:"context"`
	} `json:"contexts"`
	Clusters []struct {
		Name    string `json:"name"`
		Cluster struct {
			Server                   string `json:"server"`
			CertificateAuthority     string `json:"certificate-authority"`
			CertificateAuthorityData string `json:"certificate-authority-data"`
			InsecureSkipTLSVerify    bool   `json:"insecure-skip-tls-verify"`
		} `json:"cluster"`
	} `json:"clusters"`
	Users []struct {
		Name string `json:"name"`
		User struct {
			Token                 string `json:"token"`
			TokenFile             string `json:"tokenFile"`
			ClientCertificate     string `json:"client-certificate"`
			ClientCertificateData string `json:"client-certificate-data"`
			ClientKey             string `json:"client-key"`
			ClientKeyData         string `json:"client-key-data"`
			Exec                  any    `json:"exec"`
			AuthProvider          any    `json:"auth-provider"`
			Username              string `json:"username"`
		} `json:"user"`
	} `json:"users"`
}

// KubeconfigAPI connects to the API server named by the current context of
// the kubeconfig file at path. Supported credentials: token, tokenFile,
// client certificate (files or inline data). Relative paths are relative to
// the kubeconfig's directory, as kubectl does.
func KubeconfigAPI(path string) (*KubeAPI, error) {
	data, err := fileread.Read(path, fileread.MaxManifest)
	if err != nil {
		return nil, fmt.Errorf("kubeconfig: %w", err)
	}
	var kc kubeconfig
	if err := yaml.Unmarshal(data, &kc); err != nil {
		return nil, fmt.Errorf("kubeconfig %s: %w", path, err)
	}
	fail := func(format string, args ...any) (*KubeAPI, error) {
		return nil, fmt.Errorf("kubeconfig %s: %s", path, fmt.Sprintf(format, args...))
	}
	ctxName := kc.CurrentContext
	if ctxName == "" {
		if len(kc.Contexts) != 1 {
			return fail("no current-context")
		}
		ctxName = kc.Contexts[0].Name
	}
	var clusterName, userName string
	found := false
	for _, c := range kc.Contexts {
		if c.Name == ctxName {
			clusterName, userName, found = c.Context.Cluster, c.Context.User, true
		}
	}
	if !found {
		return fail("context %q not found", ctxName)
	}
	dir := filepath.Dir(path)
	resolve := func(p string) string {
		if p == "" || filepath.IsAbs(p) {
			return p
		}
		return filepath.Join(dir, p)
	}
	readData := func(inline, file, what string) ([]byte, error) {
		if inline != "" {
			b, err := base64.StdEncoding.DecodeString(inline)
			if err != nil {
				return nil, fmt.Errorf("kubeconfig %s: %s-data: %w", path, what, err)
			}
			return b, nil
		}
		if file != "" {
			b, err := fileread.Read(resolve(file), fileread.MaxPEM)
			if err != nil {
				return nil, fmt.Errorf("kubeconfig %s: %s: %w", path, what, err)
			}
			return b, nil
		}
		return nil, nil
	}

	var server string
	var caPEM []byte
	found = false
	for _, c := range kc.Clusters {
		if c.Name != clusterName {
			continue
		}
		found = true
		if c.Cluster.InsecureSkipTLSVerify {
			return fail("cluster %q: insecure-skip-tls-verify is not supported; give the cluster CA", clusterName)
		}
		server = c.Cluster.Server
		if caPEM, err = readData(c.Cluster.CertificateAuthorityData, c.Cluster.CertificateAuthority, "certificate-authority"); err != nil {
			return nil, err
		}
	}
	if !found {
		return fail("cluster %q not found", clusterName)
	}

	var (
		clientCert *tls.Certificate
		token      string
		tokenFile  string
	)
	found = false
	for _, u := range kc.Users {
		if u.Name != userName {
			continue
		}
		found = true
		if u.User.Exec != nil || u.User.AuthProvider != nil {
			return fail("user %q: exec and auth-provider credentials are not supported; use a token, tokenFile or client certificate", userName)
		}
		token, tokenFile = u.User.Token, resolve(u.User.TokenFile)
		certPEM, err := readData(u.User.ClientCertificateData, u.User.ClientCertificate, "client-certificate")
		if err != nil {
			return nil, err
		}
		keyPEM, err := readData(u.User.ClientKeyData, u.User.ClientKey, "client-key")
		if err != nil {
			return nil, err
		}
		if (certPEM == nil) != (keyPEM == nil) {
			return fail("user %q: client certificate and key must be given together", userName)
		}
		if certPEM != nil {
			c, err := tls.X509KeyPair(certPEM, keyPEM)
			if err != nil {
				return fail("user %q: client certificate: %v", userName, err)
			}
			clientCert = &c
		}
	}
	if !found && userName != "" {
		return fail("user %q not found", userName)
	}
	api, err := newKubeAPI(server, caPEM, clientCert, token, tokenFile)
	if err != nil {
		return nil, fmt.Errorf("kubeconfig %s: %w", path, err)
	}
	return api, nil
}

func newKubeAPI(server string, caPEM []byte, clientCert *tls.Certificate, token, tokenFile string) (*KubeAPI, error) {
	u, err := url.Parse(server)
	if err != nil || u.Scheme != "https" || u.Host == "" {
		return nil, fmt.Errorf("api server %q: want an https:// URL", server)
	}
	tlsConf := &tls.Config{MinVersion: tls.VersionTLS12}
	if len(caPEM) > 0 {
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(caPEM) {
			return nil, errors.New("cluster CA: no PEM certificates")
		}
		tlsConf.RootCAs = pool
	}
	if clientCert != nil {
		tlsConf.Certificates = []tls.Certificate{*clientCert}
	}
	transport := &http.Transport{
		Proxy:               http.ProxyFromEnvironment,
		TLSClientConfig:     tlsConf,
		TLSHandshakeTimeout: 10 * time.Second,
		MaxIdleConnsPerHost: 16,
		IdleConnTimeout:     90 * time.Second,
		ForceAttemptHTTP2:   true,
	}
	return &KubeAPI{
		server:    u,
		client:    &http.Client{Transport: transport},
		token:     token,
		tokenFile: tokenFile,
	}, nil
}

// Server is the API server's base URL.
func (k *KubeAPI) Server() string { return k.server.String() }

// Do sends req with the CA's credentials. A request URL without host is a
// path under the API server's URL; a URL of another host is refused, so the
// credentials never leave for anywhere but the API server.
func (k *KubeAPI) Do(req *http.Request) (*http.Response, error) {
	if req.URL.IsAbs() && (req.URL.Scheme != k.server.Scheme || req.URL.Host != k.server.Host) {
		return nil, fmt.Errorf("refusing to send API server credentials to %s://%s (API server is %s)", req.URL.Scheme, req.URL.Host, k.server.Host)
	}
	if !req.URL.IsAbs() {
		u := *k.server
		u.Path = strings.TrimSuffix(u.Path, "/") + "/" + strings.TrimPrefix(req.URL.Path, "/")
		u.RawPath = ""
		u.RawQuery = req.URL.RawQuery
		req.URL = &u
		req.Host = u.Host
	}
	token := k.token
	if k.tokenFile != "" {
		b, err := fileread.Read(k.tokenFile, fileread.MaxToken)
		if err != nil {
			return nil, fmt.Errorf("api server credentials: %w", err)
		}
		token = strings.TrimSpace(string(b))
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	return k.client.Do(req)
}

// CloseIdleConnections releases pooled connections.
func (k *KubeAPI) CloseIdleConnections() { k.client.CloseIdleConnections() }
