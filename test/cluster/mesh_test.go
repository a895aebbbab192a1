package cluster

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// TestCluster runs the suite's steps in order on one cluster: the demo
// deploys the CA and the sample workloads the later steps use, and the last
// step tears the cluster down.
func TestCluster(t *testing.T) {
	var rotation *rotationRun
	steps := []struct {
		name string
		run  func(*testing.T)
	}{
		{"Demo", testDemo},
		{"1_CAAuthenticatesPodsByTokenReview", testIdentities},
		{"5a_RotationUnderLoadStarts", func(t *testing.T) { rotation = startRotationUnderLoad(t) }},
		{"3_ServiceTrafficIsMTLSOnTheWire", testMTLSOnTheWire},
		{"4_IstioCRsTakeEffectWithoutRestart", testIstioCRsTakeEffect},
		{"6_GatewayNodePort", testGatewayNodePort},
		{"2_ProbesPassUnderStrict", testProbesUnderStrict},
		{"16_NodeCaptureRestricted", testNodeCapture},
		{"18_CertManagerSigner", testCertManagerSigner},
		{"5b_RotationUnderLoadHeld", func(t *testing.T) { checkRotationUnderLoad(t, rotation) }},
		{"8_DownRestoresMachine", testDownRestoresMachine},
	}
	for _, s := range steps {
		t.Run(s.name, s.run)
	}
}

// testDemo runs `make cluster-demo`'s script (deploy/kind/demo.sh with this
// cluster's platform file): images, the CA from deploy/kubernetes with
// --auth kubernetes, the injected samples, a request over mTLS, a plaintext
// and an unauthorised client refused, a forced rotation. It fails on the
// first step that does.
func testDemo(t *testing.T) {
	needCluster(t)
	dumpOnFailure(t, "demo", "istio-system")
	ctx, cancel := context.WithTimeout(context.Background(), 12*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "bash", filepath.Join(repoRoot, "deploy", "kind", "demo.sh"))
	cmd.Env = append(os.Environ(), "DEMO_PLATFORM="+filepath.Join(dir, "platform.sh"), "TIMEOUT=180s")
	cmd.WaitDelay = 10 * time.Second
	out, err := cmd.CombinedOutput()
	t.Logf("demo.sh:\n%s", out)
	if err != nil {
		t.Fatalf("demo.sh: %v", err)
	}
}

// testIdentities (item 1): the CA runs from deploy/kubernetes with --auth
// kubernetes, and each sidecar holds spiffe://cluster.local/ns/NS/sa/SA of
// its pod's real service account — which only the CA's TokenReview of the
// pod's projected token can have told it.
func testIdentities(t *testing.T) {
	needCluster(t)
	dumpOnFailure(t, "demo", "istio-system")
	args := mustKubectl(t, "-n", "istio-system", "get", "deploy/meshproxy-ca", "-o", "jsonpath={.spec.template.spec.containers[0].args}")
	if !strings.Contains(args, `"--auth","kubernetes"`) {
		t.Fatalf("the CA Deployment's args %s lack --auth kubernetes", args)
	}
	for _, app := range []string{"client", "echo", "other"} {
		sa := mustKubectl(t, "-n", "demo", "get", "deploy/"+app, "-o", "jsonpath={.spec.template.spec.serviceAccountName}")
		want := "spiffe://cluster.local/ns/demo/sa/" + sa
		var got string
		waitFor(t, app+"'s identity", time.Minute, func() error {
			out, err := kubectl("-n", "demo", "exec", "deploy/"+app, "-c", "meshproxy", "--", "meshproxy", "identity")
			got = out
			if err != nil {
				return err
			}
			if !strings.Contains(out, want) {
				return fmt.Errorf("meshproxy identity in %s shows\n%s\nwant %s", app, out, want)
			}
			return nil
		})
		for _, other := range []string{"client", "echo", "other"} {
			if other != sa && strings.Contains(got, "/sa/"+other+"\n") {
				t.Errorf("%s's sidecar also shows the identity of service account %s:\n%s", app, other, got)
			}
		}
	}
	// The CA saw the pods' tokens: the API server answered its TokenReviews.
	logs := mustKubectl(t, "-n", "istio-system", "logs", "deploy/meshproxy-ca", "--all-pods", "--tail=-1")
	if strings.Contains(logs, "forbidden") && strings.Contains(logs, "tokenreviews") {
		t.Errorf("the CA's TokenReviews were forbidden:\n%s", logs)
	}
}

// testMTLSOnTheWire (item 3): a request from client to echo's ClusterIP
// Service crosses the node's bridge as TLS with ALPN istio and never as
// plaintext; echo's sidecar lists the client's SPIFFE ID among its peers.
func testMTLSOnTheWire(t *testing.T) {
	needCluster(t)
	dumpOnFailure(t, "demo")
	echoIP := strings.TrimSpace(mustKubectl(t, "-n", "demo", "get", "pods", "-l", "app=echo", "-o", "jsonpath={.items[0].status.podIP}"))
	clientIP := strings.TrimSpace(mustKubectl(t, "-n", "demo", "get", "pods", "-l", "app=client", "-o", "jsonpath={.items[0].status.podIP}"))
	const text = "hello from echo over mesh mTLS"
	flows := captureDuring(t, []string{"tcpdump", "-i", clusterEnv["CLUSTER_BRIDGE"], "-nn", "-s", "0"}, "tcp and host "+echoIP, clientIP, echoIP, func() {
		out, err := kubectl("-n", "demo", "exec", "deploy/client", "-c", "client", "--", "demoapp", "get", "http://echo.demo.svc/")
		if err != nil || !strings.Contains(out, text) {
			t.Errorf("client -> echo.demo.svc: %q, %v", out, err)
		}
	})
	for key, stream := range flows {
		if strings.Contains(string(stream), text) || strings.Contains(string(stream), "GET / HTTP") {
			t.Errorf("plaintext HTTP on the bridge in %s: %q", key, firstBytes(stream, 200))
		}
		if key.dst.Addr().String() != echoIP || key.src.Addr().String() != clientIP {
			continue
		}
		if h, err := clientHelloOf(stream); err == nil && !slices.Contains(h.SupportedProtos, "istio") {
			t.Errorf("%s: ClientHello ALPN %v, want it to offer istio", key, h.SupportedProtos)
		}
	}
	// The kubelet's probes of the sidecar's plaintext health port come
	// from the node, not the client.
	if istioHelloes(flows, clientIP, echoIP) == 0 {
		t.Errorf("no TLS connection offering ALPN istio from the client (%s) to echo (%s) in the capture (flows: %d)", clientIP, echoIP, len(flows))
	}
	// peers lists open connections: hold one open from the client.
	held := make(chan error, 1)
	go func() {
		_, err := kubectl("-n", "demo", "exec", "deploy/client", "-c", "client", "--", "demoapp", "get", "-timeout", "40s", "http://echo.demo.svc/?hold=30s")
		held <- err
	}()
	waitFor(t, "the client's SPIFFE ID in echo's meshproxy peers", 25*time.Second, func() error {
		peers, err := kubectl("-n", "demo", "exec", "deploy/echo", "-c", "meshproxy", "--", "meshproxy", "peers")
		if err != nil {
			return err
		}
		if !strings.Contains(peers, "spiffe://cluster.local/ns/demo/sa/client") {
			return fmt.Errorf("%w: peers shows\n%s", errNotYet, peers)
		}
		return nil
	})
	if err := <-held; err != nil {
		t.Errorf("the held request failed: %v", err)
	}
	// A pod without a sidecar is refused under STRICT.
	if out, err := kubectl("-n", "demo", "exec", "deploy/plain", "-c", "plain", "--", "demoapp", "get", "-timeout", "5s", "http://echo.demo.svc/"); err == nil {
		t.Errorf("a plaintext client reached echo under STRICT: %q", out)
	}
}

func firstBytes(b []byte, n int) []byte {
	if len(b) > n {
		return b[:n]
	}
	return b
}
