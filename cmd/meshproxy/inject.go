package main

import (
	"fmt"
	"io"
	"log/slog"
	"os"

	"github.com/spf13/cobra"

	"github.com/meshproxy/meshproxy/inject"
	"github.com/meshproxy/meshproxy/internal/atomicfile"
)

func newInjectCmd() *cobra.Command {
	var (
		file, output, image, caAddr, mode, ebpfCgroup string
		capture, configServer, csrTrustDomain         string
		meshCIDRs, exclPorts, exclCIDRs               []string
		proxyUID                                      int64
		native                                        bool
	)
	cmd := &cobra.Command{
		Use:   "inject -f MANIFEST.yaml|- [-o FILE]",
		Short: "Add the capture step and the meshproxy sidecar to Kubernetes workloads",
		Long: `inject reads a multi-document Kubernetes manifest and, like istioctl kube-inject,
adds to every Pod, Deployment, StatefulSet, DaemonSet, ReplicaSet, Job and CronJob
(also inside kind: List) the init container meshproxy-init (meshproxy redirect
install) and the meshproxy sidecar (meshproxy run), with their volumes and
annotations. The application's httpGet, tcpSocket and grpc probes are rewritten,
as Istio does, to the sidecar's health port 15021 at
/app-health/CONTAINER/livez|readyz|startupz, where the sidecar runs the original
probes against the app (under STRICT the kubelet's plaintext probes would be
refused). Workloads annotated or labelled sidecar.meshproxy.io/inject: "false"
or sidecar.istio.io/inject: "false" are left alone, as is every other document,
byte for byte. Injecting an injected manifest again changes nothing; with new
flags it updates what was injected.

Workloads are decoded strictly: an unknown field is an error naming the document
and the field. Each namespace needs the ConfigMap meshproxy-ca-root (key
root-cert.pem) and may have meshproxy-policy (Istio policy YAML); with
--config-server the sidecars follow the cluster's Istio custom resources
through the CA instead (ca serve --mirror-istio-config).

With --capture node, meshproxy's CNI plugin (meshproxy node-agent, a DaemonSet)
installs the capture from the node before any container starts; the pod gets
annotations saying what to capture, and instead of meshproxy-init a validation
init container (meshproxy-validation: no capability, not root) that fails the
pod when the capture is not in place. Every container meshproxy adds then meets
the restricted Pod Security Standard.

What happened to each workload is reported on stderr; the manifest goes to
stdout or to -o FILE.`,
		Example: `  meshproxy inject -f app.yaml | kubectl apply -f -
  kubectl get deploy web -o yaml | meshproxy inject -f - --mesh-cidrs 10.244.0.0/16,10.96.0.0/12`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if file == "" {
				return usagef("--file (-f) is required: a manifest path, or - for stdin")
			}
			opts := []inject.Option{inject.WithVersion(version), inject.WithNativeSidecar(native)}
			// Each flag's option is checked on its own so the error names the flag.
			add := func(flag string, o inject.Option, with ...inject.Option) error {
				if _, err := inject.New(append(with, o)...); err != nil {
					return usagef("--%s: %v", flag, err)
				}
				opts = append(opts, o)
				return nil
			}
			m, err := inject.ParseMode(mode)
			if err != nil {
				return usagef("--mode: %v", err)
			}
			meshPrefixes, err := inject.ParsePrefixes(meshCIDRs)
			if err != nil {
				return usagef("--mesh-cidrs: %v", err)
			}
			exclPrefixes, err := inject.ParsePrefixes(exclCIDRs)
			if err != nil {
				return usagef("--exclude-outbound-cidrs: %v", err)
			}
			ports, err := inject.ParsePorts(exclPorts)
			if err != nil {
				return usagef("--exclude-inbound-ports: %v", err)
			}
			if ebpfCgroup != "" && m != inject.ModeEBPF {
				return usagef("--ebpf-cgroup: only used with --mode ebpf")
			}
			capt, err := inject.ParseCapture(capture)
			if err != nil {
				return usagef("--capture: %v", err)
			}
			if capt == inject.CaptureNode && ebpfCgroup != "" {
				return usagef("--ebpf-cgroup: not used with --capture node (the node finds the pod's cgroup)")
			}
			for _, e := range []error{
				add("image", inject.WithImage(image)),
				add("mode", inject.WithMode(m)),
				add("ca-addr", inject.WithCAAddr(caAddr)),
				add("mesh-cidrs", inject.WithMeshCIDRs(meshPrefixes...)),
				add("exclude-outbound-cidrs", inject.WithExcludeOutboundCIDRs(exclPrefixes...)),
				add("exclude-inbound-ports", inject.WithExcludeInboundPorts(ports...)),
				add("proxy-uid", inject.WithProxyUID(proxyUID)),
				add("capture", inject.WithCapture(capt), inject.WithExcludeOutboundCIDRs(exclPrefixes...)),
			} {
				if e != nil {
					return e
				}
			}
			if configServer != "" {
				if err := add("config-server", inject.WithConfigServer(configServer)); err != nil {
					return err
				}
			}
			if csrTrustDomain != "" {
				if err := add("csr-trust-domain", inject.WithCSRTrustDomain(csrTrustDomain)); err != nil {
					return err
				}
			}
			if ebpfCgroup != "" {
				if err := add("ebpf-cgroup", inject.WithEBPFCgroup(ebpfCgroup), inject.WithMode(m)); err != nil {
					return err
				}
			}
			inj, err := inject.New(opts...)
			if err != nil {
				return usagef("%v", err)
			}

			src, name, err := readManifest(cmd, file)
			if err != nil {
				return err
			}
			out, results, err := inj.Manifest(src)
			if err != nil {
				return fmt.Errorf("inject %s: %w", name, err)
			}
			log := slog.New(slog.NewTextHandler(cmd.ErrOrStderr(), nil))
			for _, r := range results {
				log.Info(r.String(), "injected", r.Injected)
			}
			if len(results) == 0 {
				log.Warn("no workloads found", "file", name)
			}
			if len(meshCIDRs) == 0 {
				log.Warn("no --mesh-cidrs: outbound traffic gets mesh mTLS only where a DestinationRule says ISTIO_MUTUAL")
			}
			if output == "" || output == "-" {
				_, err := cmd.OutOrStdout().Write(out)
				return err
			}
			return writeFileAtomic(output, out)
		},
	}
	f := cmd.Flags()
	f.StringVarP(&file, "file", "f", "", "manifest to inject (- for stdin)")
	f.StringVarP(&output, "output", "o", "", "write the injected manifest to FILE instead of stdout")
	f.StringVar(&image, "image", inject.DefaultImage(version), "meshproxy image for the init and sidecar containers")
	f.StringVar(&caAddr, "ca-addr", inject.DefaultCAAddr(), "CA address the sidecar requests certificates from")
	f.StringVar(&configServer, "config-server", "", "HOST:PORT of the CA's Istio config mirror, e.g. meshproxy-ca.istio-system.svc:15011: sidecars follow the cluster's Istio CRs (run --config-server) instead of the meshproxy-policy ConfigMap")
	f.StringVar(&csrTrustDomain, "csr-trust-domain", "", "sidecars name spiffe://TRUST-DOMAIN/ns/NAMESPACE/sa/SERVICE-ACCOUNT in their CSRs (run --ca-spiffe-id), as a CA with --signer certmanager needs, e.g. cluster.local")
	f.StringSliceVar(&meshCIDRs, "mesh-cidrs", nil, "outbound destinations that get mesh mTLS (CIDR,...), e.g. the pod and service ranges")
	f.StringSliceVar(&exclPorts, "exclude-inbound-ports", nil, "inbound ports left uncaptured (PORT,...)")
	f.StringSliceVar(&exclCIDRs, "exclude-outbound-cidrs", nil, "outbound destinations left uncaptured (CIDR,...)")
	f.StringVar(&mode, "mode", string(inject.DefaultMode), "capture mode of the init container: nftables, iptables or ebpf")
	f.Int64Var(&proxyUID, "proxy-uid", inject.DefaultProxyUID, "uid and gid the sidecar runs as; capture exempts its traffic")
	f.BoolVar(&native, "native-sidecar", true, "inject the sidecar as a native sidecar (init container with restartPolicy Always, Kubernetes 1.29+); false: a regular container")
	f.StringVar(&capture, "capture", string(inject.CaptureInit), "who installs capture: init (an init container with NET_ADMIN) or node (meshproxy's CNI plugin; no capability in the pod, restricted Pod Security)")
	f.StringVar(&ebpfCgroup, "ebpf-cgroup", "", "ebpf mode: the pod's cgroup v2 path below the host cgroup mount; $(POD_UID) is expanded; auto: the init container finds it (default "+inject.DefaultEBPFCgroup+")")
	return cmd
}

// readManifest reads the manifest from a file or, for "-", stdin.
func readManifest(cmd *cobra.Command, file string) ([]byte, string, error) {
	const maxManifest = 64 << 20
	if file == "-" {
		b, err := io.ReadAll(io.LimitReader(cmd.InOrStdin(), maxManifest+1))
		if err != nil {
			return nil, "stdin", fmt.Errorf("read stdin: %w", err)
		}
		if len(b) > maxManifest {
			return nil, "stdin", fmt.Errorf("read stdin: manifest larger than %d bytes", maxManifest)
		}
		return b, "stdin", nil
	}
	fi, err := os.Stat(file)
	if err != nil {
		return nil, file, fmt.Errorf("read manifest: %w", err)
	}
	if !fi.Mode().IsRegular() || fi.Size() > maxManifest {
		return nil, file, fmt.Errorf("read manifest %s: not a regular file of at most %d bytes", file, maxManifest)
	}
	b, err := os.ReadFile(file)
	if err != nil {
		return nil, file, fmt.Errorf("read manifest: %w", err)
	}
	return b, file, nil
}

// writeFileAtomic writes data to path through a temporary file in the same
// directory, so a failed write never leaves half a manifest behind.
func writeFileAtomic(path string, data []byte) error {
	return atomicfile.Write(path, data, 0o644)
}
