// Command cert-manager-controller runs cert-manager's own controllers —
// the CA issuer, the Issuer/ClusterIssuer readiness controllers and the
// internal CertificateRequest approver — from cert-manager's Go module
// against a Kubernetes API server, for meshproxy's certmanager signer test
// (package ca/certmanager). cert-manager's cmd/controller is a module that
// the module proxy does not serve, so this is the small part of its main
// that starts registered controllers, with its flags' defaults.
//
// It is part of the Kubernetes tools module (test/cluster/tools), which keeps
// cert-manager's dependency graph out of meshproxy's go.mod and shares the
// Kubernetes libraries' compiled packages with the cluster's own binaries;
// test/cluster/tools/build.sh builds it.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"

	controllerpkg "github.com/cert-manager/cert-manager/pkg/controller"
	logf "github.com/cert-manager/cert-manager/pkg/logs"

	// The controllers this command runs register themselves in init.
	_ "github.com/cert-manager/cert-manager/pkg/controller/certificaterequests/approver"
	_ "github.com/cert-manager/cert-manager/pkg/controller/certificaterequests/ca"
	_ "github.com/cert-manager/cert-manager/pkg/controller/clusterissuers"
	_ "github.com/cert-manager/cert-manager/pkg/controller/issuers"
	_ "github.com/cert-manager/cert-manager/pkg/issuer/ca"
)

// defaultControllers are those started unless -controllers says otherwise,
// by their registered names.
const defaultControllers = "issuers,clusterissuers,certificaterequests-issuer-ca,certificaterequests-approver"

func main() {
	kubeconfig := flag.String("kubeconfig", "", "kubeconfig of the API server")
	namespace := flag.String("namespace", "", "namespace to watch (default: all)")
	clusterNS := flag.String("cluster-resource-namespace", "cert-manager", "namespace of ClusterIssuer secrets")
	list := flag.String("controllers", defaultControllers, "controllers to run, comma-separated")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, *kubeconfig, *namespace, *clusterNS, strings.Split(*list, ",")); err != nil {
		fmt.Fprintln(os.Stderr, "cert-manager-controller:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, kubeconfig, namespace, clusterNS string, controllers []string) error {
	ctx = logf.NewContext(ctx, logf.Log, "cert-manager-controller")
	factory, err := controllerpkg.NewContextFactory(ctx, controllerpkg.ContextOptions{
		Kubeconfig:         kubeconfig,
		Namespace:          namespace,
		KubernetesAPIQPS:   20,
		KubernetesAPIBurst: 50,
		IssuerOptions: controllerpkg.IssuerOptions{
			ClusterResourceNamespace: clusterNS,
		},
		CertificateOptions: controllerpkg.CertificateOptions{
			CertificateRequestMinimumBackoffDuration: 3600e9,
			CertificateRequestMaximumBackoffDuration: 32 * 3600e9,
		},
	})
	if err != nil {
		return err
	}
	var started []controllerpkg.Interface
	for _, name := range controllers {
		construct, ok := controllerpkg.Known()[name]
		if !ok {
			return fmt.Errorf("controller %q is not registered (have %s)", name, strings.Join(known(), ", "))
		}
		c, err := construct(factory)
		if err != nil {
			return fmt.Errorf("controller %s: %w", name, err)
		}
		started = append(started, c)
	}
	shared, err := factory.Build()
	if err != nil {
		return err
	}
	shared.SharedInformerFactory.Start(ctx.Done())
	shared.KubeSharedInformerFactory.Start(ctx.Done())
	var wg sync.WaitGroup
	errs := make(chan error, len(started))
	for i, c := range started {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := c.Run(2, ctx); err != nil {
				errs <- fmt.Errorf("controller %s: %w", controllers[i], err)
			}
		}()
	}
	fmt.Fprintln(os.Stderr, "cert-manager-controller: running", strings.Join(controllers, ", "))
	wg.Wait()
	close(errs)
	return <-errs
}

func known() []string {
	var names []string
	for n := range controllerpkg.Known() {
		names = append(names, n)
	}
	return names
}
