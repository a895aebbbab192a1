package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/meshproxy/meshproxy/ca"
)

// caServeRotationHelp is the part of `ca serve --help` about reloads and
// the bundle endpoint.
const caServeRotationHelp = `
With the builtin signer, serve watches --dir and picks up changed files (a root
rotation by "ca rotate-root", or new files from your own tooling) without a
restart; files that do not load are reported and the CA keeps what it had. It
records in --dir/rotation-issued.json when the certificates it signs expire,
per root, so that "ca rotate-root" knows when an old root may be retired.

--bundle-endpoint ADDR serves the SPIFFE bundle endpoint (profile https_spiffe)
at https://ADDR/: the CA's trust bundle, every root, as a SPIFFE bundle with
spiffe_refresh_hint --bundle-refresh-hint. Its TLS certificate is the CA's own
serving certificate, the X.509-SVID spiffe://TD/ns/istio-system/sa/meshproxy-ca.
Sidecars of other trust domains federate with it:
  meshproxy run --federate-with TD=https://ADDR/@root-cert.pem ...
`

// caRotationFlags are the reload and bundle endpoint flags of `ca serve`.
type caRotationFlags struct {
	bundleEndpoint string
	refreshHint    time.Duration
}

func (rf *caRotationFlags) register(f *pflag.FlagSet) {
	f.StringVar(&rf.bundleEndpoint, "bundle-endpoint", "", "serve the SPIFFE bundle endpoint (https_spiffe) on this address, e.g. :15443; empty disables it")
	f.DurationVar(&rf.refreshHint, "bundle-refresh-hint", ca.DefaultBundleRefreshHint, "refresh hint published by the bundle endpoint: how often federated peers fetch the bundle again")
}

// serverOptions validates the flags and returns the server options: the
// bundle endpoint, and with the builtin signer the reload of dir (loaded
// with loadOpts, as at start).
func (rf *caRotationFlags) serverOptions(signer, dir string, loadOpts []ca.Option) ([]ca.ServerOption, error) {
	var opts []ca.ServerOption
	if rf.bundleEndpoint != "" {
		if !isHostPort(rf.bundleEndpoint) {
			return nil, usagef("--bundle-endpoint %q: want HOST:PORT, e.g. :15443", rf.bundleEndpoint)
		}
		if rf.refreshHint < time.Second {
			return nil, usagef("--bundle-refresh-hint must be at least 1s, got %s", rf.refreshHint)
		}
		opts = append(opts, ca.WithBundleEndpoint(rf.bundleEndpoint, rf.refreshHint))
	}
	if signer == ca.SignerBuiltin && dir != "" {
		opts = append(opts, ca.WithReload(dir, func() (*ca.Authority, error) { return ca.Load(dir, loadOpts...) }))
	}
	return opts, nil
}

func newCARotateRootCmd() *cobra.Command {
	var (
		dir, phase, keyType string
		rootTTL, caTTL      time.Duration
		force               bool
	)
	cmd := &cobra.Command{
		Use:   "rotate-root --dir DIR [--phase add|switch|retire]",
		Short: "Rotate the CA's root without downtime, one phase per run",
		Long: `rotate-root replaces the root of the CA in DIR in three steps, one per run, so
that every workload trusts the new root before any certificate chains to it and
no certificate still in use chains to a root that is withdrawn:

  add      a new root and a signing certificate under it are generated; the root
           is appended to root-cert.pem (the trust bundle now holds both), the
           signing certificate and key are staged as next-ca-cert.pem,
           next-ca-key.pem, next-cert-chain.pem. Signing continues as before.
  switch   the staged signing certificate replaces ca-cert.pem, ca-key.pem and
           cert-chain.pem: new certificates chain to the new root. Both roots
           stay trusted.
  retire   the old root is removed from root-cert.pem. Refused while
           certificates signed under it are live (as recorded by "ca serve" in
           rotation-issued.json), unless --force.

Without --phase each run performs the next step; with --phase a step that is
not the next one is refused. The phase is kept in rotation-state.json; "meshproxy
ca status --dir DIR" shows it and what is outstanding. A running "ca serve" on
DIR picks up every step by itself; sidecars watching their --ca-root file renew
at once when the roots change (copy root-cert.pem to wherever they read it, e.g.
the istio-ca-root-cert ConfigMap, after add and after retire).

Between add and switch, give every sidecar time to learn the new root (they do
at their next renewal, or at once if they watch a --ca-root that you updated);
between switch and retire, wait until the old certificates have expired
("ca status" says until when).`,
		Example: `  meshproxy ca rotate-root --dir /etc/cacerts           # add
  meshproxy ca status --dir /etc/cacerts
  meshproxy ca rotate-root --dir /etc/cacerts           # switch
  meshproxy ca rotate-root --dir /etc/cacerts --phase retire`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if dir == "" {
				return usagef("--dir is required")
			}
			var step ca.Step
			if phase != "" {
				var err error
				if step, err = ca.ParseStep(phase); err != nil {
					return usagef("--phase: %v", err)
				}
			}
			opts := []ca.InitOption{ca.WithForce(force)}
			if keyType != "" {
				kt, err := ca.ParseKeyType(keyType)
				if err != nil {
					return usagef("--key-type: %v", err)
				}
				opts = append(opts, ca.WithKeyType(kt))
			}
			if rootTTL <= 0 {
				return usagef("--root-ttl must be positive, got %s", rootTTL)
			}
			if caTTL <= 0 {
				return usagef("--ca-ttl must be positive, got %s", caTTL)
			}
			if caTTL > rootTTL {
				return usagef("--ca-ttl %s exceeds --root-ttl %s: the signing certificate cannot outlive its root", caTTL, rootTTL)
			}
			opts = append(opts, ca.WithRootTTL(rootTTL), ca.WithCATTL(caTTL))
			done, err := ca.RotateRoot(dir, step, opts...)
			if err != nil {
				if errors.Is(err, ca.ErrRotationOrder) {
					return usageError{err}
				}
				if errors.Is(err, ca.ErrCertsOutstanding) {
					return fmt.Errorf("%w; --force retires anyway", err)
				}
				return err
			}
			st, err := ca.RotationStatusOf(dir, time.Now())
			if err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			switch done {
			case ca.StepAdd:
				fmt.Fprintf(w, "added a new root to %s; signing continues under the old root.\n", dir)
			case ca.StepSwitch:
				fmt.Fprintf(w, "switched signing to the new root in %s; both roots stay trusted.\n", dir)
			case ca.StepRetire:
				fmt.Fprintf(w, "retired the old root from %s; the rotation is complete.\n", dir)
			}
			return writeRotationStatus(w, st)
		},
	}
	f := cmd.Flags()
	f.StringVar(&dir, "dir", "", "CA directory in Istio's plugged-in layout")
	f.StringVar(&phase, "phase", "", "the step to perform: add, switch or retire (default: the next one)")
	f.BoolVar(&force, "force", false, "retire although certificates signed under the old root may still be live")
	f.DurationVar(&rootTTL, "root-ttl", ca.DefaultRootTTL, "add: lifetime of the new root")
	f.DurationVar(&caTTL, "ca-ttl", ca.DefaultCATTL, "add: lifetime of the new signing certificate; at most --root-ttl")
	f.StringVar(&keyType, "key-type", "", "add: key algorithm of the new root and signing certificate (default: that of the current one): "+joinKeyTypes())
	return cmd
}

func newCAStatusCmd() *cobra.Command {
	var dir, output string
	cmd := &cobra.Command{
		Use:   "status --dir DIR [-o text|json]",
		Short: "Show the CA's roots, signing certificate and root rotation phase",
		Long: `status reads the CA in DIR and prints the trust domain, the phase of a root
rotation (idle, added, switched), every root of the trust bundle with its expiry
and role, the signing certificate, and what is outstanding: how many
certificates signed under the old root are still live, and until when (as
recorded by "ca serve" in rotation-issued.json).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if dir == "" {
				return usagef("--dir is required")
			}
			if output != "text" && output != "json" {
				return usagef("--output must be text or json, not %q", output)
			}
			st, err := ca.RotationStatusOf(dir, time.Now())
			if err != nil {
				return err
			}
			if output == "json" {
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				return enc.Encode(st)
			}
			return writeRotationStatus(cmd.OutOrStdout(), st)
		},
	}
	f := cmd.Flags()
	f.StringVar(&dir, "dir", "", "CA directory in Istio's plugged-in layout")
	f.StringVarP(&output, "output", "o", "text", "output format: text or json")
	return cmd
}

// writeRotationStatus prints st for people.
func writeRotationStatus(w io.Writer, st *ca.RotationStatus) error {
	ts := func(t time.Time) string { return t.UTC().Format(time.RFC3339) }
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "Trust domain:\t%s\n", st.TrustDomain)
	phase := string(st.Phase)
	switch st.Phase {
	case ca.PhaseAdded:
		phase += fmt.Sprintf(" (new root published %s; signing with the old root)", ts(st.AddedAt))
	case ca.PhaseSwitched:
		phase += fmt.Sprintf(" (signing with the new root since %s; old root still trusted)", ts(st.SwitchedAt))
	default:
		if !st.RetiredAt.IsZero() {
			phase += fmt.Sprintf(" (last rotation completed %s)", ts(st.RetiredAt))
		}
	}
	fmt.Fprintf(tw, "Phase:\t%s\n", phase)
	fmt.Fprintf(tw, "Signing certificate:\t%s, valid until %s, under root %s\n", st.Signing.Subject, ts(st.Signing.NotAfter), st.Signing.Root[:16])
	if st.Staged != nil {
		fmt.Fprintf(tw, "Staged:\t%s, valid until %s, under root %s\n", st.Staged.Subject, ts(st.Staged.NotAfter), st.Staged.Root[:16])
	}
	fmt.Fprintln(tw, "Roots:")
	for _, r := range st.Roots {
		issued := "not recorded"
		if r.Recorded {
			issued = fmt.Sprintf("%d issued, %d live", r.Issued, r.Live)
			if r.Live > 0 {
				issued += " until " + ts(r.LiveUntil)
			}
		}
		fmt.Fprintf(tw, "  %s\t%s\t%s\tvalid until %s\t%s\n", r.SHA256[:16], r.Role, r.Subject, ts(r.NotAfter), issued)
	}
	next := string(st.NextStep)
	switch {
	case st.Phase == ca.PhaseSwitched && st.RetireBlocked != "":
		fmt.Fprintf(tw, "Outstanding:\t%s\n", st.RetireBlocked)
		next += " (refused until then, or with --force)"
	case st.Phase == ca.PhaseSwitched:
		fmt.Fprintf(tw, "Outstanding:\tnothing: no certificate signed under the old root is live\n")
	case st.Phase == ca.PhaseAdded:
		next += " (once every workload trusts the new root)"
	}
	fmt.Fprintf(tw, "Next step:\tmeshproxy ca rotate-root --dir %s   # %s\n", shellQuote(st.Dir), next)
	return tw.Flush()
}

// shellQuote quotes s for a copy-pasted command line when it needs it.
func shellQuote(s string) string {
	if s != "" && !strings.ContainsAny(s, " \t\n'\"\\$`!*?[]{}()<>|&;#~") {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}
