package cluster

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// gatewayManifests: a STRICT meshed service (shop), an unmeshed TLS server
// (vault), and the gateway as a Deployment with a NodePort Service: HTTPS
// for shop.example.com terminated and sent on over mesh mTLS, TLS for
// vault.example.com passed through by SNI.
const gatewayManifests = `apiVersion: v1
kind: ServiceAccount
metadata: {name: shop, namespace: gw}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: shop, namespace: gw, labels: {app: shop}}
spec:
  replicas: 1
  selector: {matchLabels: {app: shop}}
  template:
    metadata: {labels: {app: shop}}
    spec:
      serviceAccountName: shop
      automountServiceAccountToken: false
      containers:
      - name: app
        image: meshproxy-demo-app:dev
        imagePullPolicy: IfNotPresent
        args: ["serve", "-listen=:8080", "-text=shop over the gateway"]
        ports: [{name: http, containerPort: 8080}]
        securityContext: {runAsNonRoot: true, runAsUser: 65532, allowPrivilegeEscalation: false, readOnlyRootFilesystem: true, capabilities: {drop: [ALL]}}
---
apiVersion: v1
kind: Service
metadata: {name: shop, namespace: gw}
spec:
  selector: {app: shop}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: vault, namespace: gw, labels: {app: vault}}
spec:
  replicas: 1
  selector: {matchLabels: {app: vault}}
  template:
    metadata:
      labels: {app: vault}
      annotations: {sidecar.meshproxy.io/inject: "false"}
    spec:
      automountServiceAccountToken: false
      containers:
      - name: app
        image: meshproxy-demo-app:dev
        imagePullPolicy: IfNotPresent
        args: ["serve", "-listen=:8443", "-text=vault passed through", "-tls-cert=/tls/tls.crt", "-tls-key=/tls/tls.key"]
        ports: [{name: https, containerPort: 8443}]
        securityContext: {runAsNonRoot: true, runAsUser: 65532, allowPrivilegeEscalation: false, readOnlyRootFilesystem: true, capabilities: {drop: [ALL]}}
        volumeMounts: [{name: tls, mountPath: /tls, readOnly: true}]
      volumes:
      - name: tls
        secret: {secretName: vault-tls, defaultMode: 0444}
---
apiVersion: v1
kind: Service
metadata: {name: vault, namespace: gw}
spec:
  selector: {app: vault}
  ports: [{name: https, port: 443, targetPort: https}]
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: ingress, namespace: gw}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: gateway-config, namespace: gw}
data:
  gateway.yaml: |
    apiVersion: networking.istio.io/v1
    kind: Gateway
    metadata: {name: ingress, namespace: gw}
    spec:
      selector: {istio: ingressgateway}
      servers:
      - port: {number: 9443, name: https, protocol: HTTPS}
        hosts: ["gw/shop.example.com"]
        tls: {mode: SIMPLE, credentialName: shop-cert}
      - port: {number: 9444, name: tls, protocol: TLS}
        hosts: ["gw/vault.example.com"]
        tls: {mode: PASSTHROUGH}
    ---
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: shop, namespace: gw}
    spec:
      hosts: ["shop.example.com"]
      gateways: ["gw/ingress"]
      tcp:
      - match: [{port: 9443}]
        route: [{destination: {host: shop.gw.svc.cluster.local, port: {number: 80}}}]
    ---
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: vault, namespace: gw}
    spec:
      hosts: ["vault.example.com"]
      gateways: ["gw/ingress"]
      tls:
      - match: [{port: 9444, sniHosts: ["vault.example.com"]}]
        route: [{destination: {host: vault.gw.svc.cluster.local, port: {number: 443}}}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: ingress, namespace: gw, labels: {app: ingress}}
spec:
  replicas: 1
  selector: {matchLabels: {app: ingress}}
  template:
    metadata:
      labels: {app: ingress, istio: ingressgateway}
      annotations: {sidecar.meshproxy.io/inject: "false"}
    spec:
      serviceAccountName: ingress
      automountServiceAccountToken: false
      containers:
      - name: gateway
        image: meshproxy:dev
        imagePullPolicy: IfNotPresent
        args: ["gateway", "--ca-addr", "meshproxy-ca.istio-system.svc:15012",
          "--ca-root", "/etc/meshproxy/ca/root-cert.pem", "--token-file", "/var/run/secrets/tokens/istio-token",
          "--config-dir", "/etc/meshproxy/gateway", "--credentials-dir", "/etc/meshproxy/credentials",
          "--listen-host", "0.0.0.0", "--admin", "127.0.0.1:15000", "--health", ":15021"]
        ports:
        - {name: https, containerPort: 9443}
        - {name: tls, containerPort: 9444}
        readinessProbe:
          httpGet: {path: /healthz/ready, port: 15021}
          periodSeconds: 2
        securityContext: {runAsNonRoot: true, runAsUser: 1337, allowPrivilegeEscalation: false, readOnlyRootFilesystem: true, capabilities: {drop: [ALL]}}
        volumeMounts:
        - {name: ca-root, mountPath: /etc/meshproxy/ca, readOnly: true}
        - {name: istio-token, mountPath: /var/run/secrets/tokens, readOnly: true}
        - {name: config, mountPath: /etc/meshproxy/gateway, readOnly: true}
        - {name: credentials, mountPath: /etc/meshproxy/credentials, readOnly: true}
      volumes:
      - name: ca-root
        configMap: {name: meshproxy-ca-root}
      - name: istio-token
        projected:
          sources:
          - serviceAccountToken: {audience: istio-ca, expirationSeconds: 3600, path: istio-token}
      - name: config
        configMap: {name: gateway-config}
      - name: credentials
        secret: {secretName: gateway-credentials, defaultMode: 0440}
      securityContext: {fsGroup: 1337}
---
apiVersion: v1
kind: Service
metadata: {name: ingress, namespace: gw}
spec:
  type: NodePort
  selector: {app: ingress}
  ports:
  - {name: https, port: 9443, targetPort: https, nodePort: 32443}
  - {name: tls, port: 9444, targetPort: tls, nodePort: 32444}
`

// selfSigned returns a PEM certificate and key for host.
func selfSigned(t *testing.T, host string) (certPEM, keyPEM []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), DNSNames: []string{host},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER})
}

// testGatewayNodePort (item 6): HTTPS from the host through the gateway's
// NodePort to a STRICT service, and TLS passed through by SNI.
func testGatewayNodePort(t *testing.T) {
	needCluster(t)
	if _, err := kubectl("get", "namespace", "gw"); err != nil {
		mustKubectl(t, "create", "namespace", "gw")
	}
	t.Cleanup(func() { kubectl("delete", "namespace", "gw", "--wait=false") })
	dumpOnFailure(t, "gw") // runs before the delete
	tmp := t.TempDir()
	write := func(name string, data []byte) string {
		p := filepath.Join(tmp, name)
		if err := os.WriteFile(p, data, 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	root := mustKubectl(t, "-n", "demo", "get", "configmap", "meshproxy-ca-root", "-o", `jsonpath={.data.root-cert\.pem}`)
	shopCert, shopKey := selfSigned(t, "shop.example.com")
	vaultCert, vaultKey := selfSigned(t, "vault.example.com")
	for _, args := range [][]string{
		{"configmap", "meshproxy-ca-root", "--from-file=root-cert.pem=" + write("root.pem", []byte(root))},
		{"configmap", "meshproxy-policy", "--from-file=" + filepath.Join(repoRoot, "deploy/kubernetes/samples/policy/mesh-peerauthentication.yaml")},
		{"secret", "generic", "gateway-credentials", "--from-file=shop-cert.crt=" + write("shop.crt", shopCert), "--from-file=shop-cert.key=" + write("shop.key", shopKey)},
		{"secret", "generic", "vault-tls", "--from-file=tls.crt=" + write("vault.crt", vaultCert), "--from-file=tls.key=" + write("vault.key", vaultKey)},
	} {
		out := mustKubectl(t, append(append([]string{"-n", "gw", "create"}, args...), "--dry-run=client", "-o", "yaml")...)
		applyYAML(t, out)
	}
	apiIP := strings.TrimSpace(mustKubectl(t, "-n", "default", "get", "service", "kubernetes", "-o", "jsonpath={.spec.clusterIP}"))
	injected, err := exec.Command(meshproxyCLI, "inject", "-f", write("gw.yaml", []byte(gatewayManifests)), "--image", "meshproxy:dev",
		"--mesh-cidrs", "10.244.0.0/16,10.96.0.0/16",
		"--exclude-outbound-cidrs", apiIP+"/32,"+clusterEnv["CLUSTER_DNS_IP"]+"/32").Output()
	if err != nil {
		t.Fatalf("inject: %v", err)
	}
	applyYAML(t, string(injected))
	for _, d := range []string{"shop", "vault", "ingress"} {
		mustKubectl(t, "-n", "gw", "rollout", "status", "deploy/"+d, "--timeout=180s")
	}
	node := clusterEnv["CLUSTER_NODE_IP"]
	get := func(host, port string, rootPEM []byte) (string, error) {
		roots := x509.NewCertPool()
		roots.AppendCertsFromPEM(rootPEM)
		c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
			DisableKeepAlives: true,
			TLSClientConfig:   &tls.Config{RootCAs: roots, ServerName: host},
			DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
				return (&net.Dialer{}).DialContext(ctx, network, net.JoinHostPort(node, port))
			},
		}}
		resp, err := c.Get("https://" + host + ":" + port + "/")
		if err != nil {
			return "", err
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<16))
		if resp.StatusCode != http.StatusOK {
			return string(body), fmt.Errorf("status %d", resp.StatusCode)
		}
		return string(body), err
	}
	t.Run("SIMPLE_to_STRICT", func(t *testing.T) {
		waitFor(t, "HTTPS through the gateway's NodePort to the STRICT shop", 90*time.Second, func() error {
			body, err := get("shop.example.com", "32443", shopCert)
			if err != nil {
				return err
			}
			if !strings.Contains(body, "shop over the gateway") {
				return fmt.Errorf("body %q", body)
			}
			return nil
		})
	})
	t.Run("PASSTHROUGH", func(t *testing.T) {
		waitFor(t, "TLS passed through the gateway's NodePort to vault", 90*time.Second, func() error {
			body, err := get("vault.example.com", "32444", vaultCert)
			if err != nil {
				return err
			}
			if !strings.Contains(body, "vault passed through") {
				return fmt.Errorf("body %q", body)
			}
			return nil
		})
	})
}
