// Command meshproxy is a userspace mTLS sidecar proxy with SPIFFE identities:
// a CA, the sidecar, the traffic-capture init step and inspection tools in one
// binary. This package only parses flags and calls the packages that do the work.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

// usageError marks errors that should exit with status 2.
type usageError struct{ err error }

func (e usageError) Error() string { return e.err.Error() }
func (e usageError) Unwrap() error { return e.err }

// usagef returns a usage error (exit status 2).
func usagef(format string, args ...any) error {
	return usageError{fmt.Errorf(format, args...)}
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ctx = context.WithValue(ctx, restartKey{}, restartFunc(restartSelf))
	if isCNIInvocation(os.Args[0]) {
		os.Exit(run(ctx, []string{"cni"})) // the runtime passes everything in the environment
	}
	os.Exit(run(ctx, os.Args[1:]))
}

// restartKey is the context key of the process's restartFunc: main's
// context carries it, in-process tests' contexts do not (they must never
// exec).
type restartKey struct{}

// restartFunc re-executes the process with GOMAXPROCS=n, telling it the
// processors its runtime had started with; it returns only on failure.
type restartFunc func(n, started int) error

// restartSelf re-executes this binary, same arguments and environment, with
// GOMAXPROCS=n so that the Go runtime starts with n processors.
func restartSelf(n, started int) error {
	env := append(os.Environ(), "GOMAXPROCS="+strconv.Itoa(n), restartedEnv+"="+strconv.Itoa(started))
	if err := syscall.Exec(selfPath(), os.Args, env); err != nil {
		return fmt.Errorf("re-execute with GOMAXPROCS=%d: %w", n, err)
	}
	return nil
}

// selfPath is the path to execute this binary again by: its own path when
// that still names the running file, so the process keeps its name (the
// kernel names it after the executed file: ps, top and /proc/PID/comm
// would show "exe"), else /proc/self/exe (the file was replaced or
// removed since it started).
func selfPath() string {
	const self = "/proc/self/exe"
	path, err := os.Executable()
	if err != nil {
		return self
	}
	running, err1 := os.Stat(self)
	named, err2 := os.Stat(path)
	if err1 != nil || err2 != nil || !os.SameFile(running, named) {
		return self
	}
	return path
}

// run executes the command line and returns the process exit status.
func run(ctx context.Context, args []string) int {
	root := newRootCmd()
	root.SetArgs(args)
	err := root.ExecuteContext(ctx)
	if err == nil {
		return 0
	}
	fmt.Fprintf(os.Stderr, "meshproxy: %v\n", err)
	var ue usageError
	if errors.As(err, &ue) {
		return 2
	}
	return 1
}

func newRootCmd() *cobra.Command {
	root := &cobra.Command{
		Use:   "meshproxy",
		Short: "mTLS sidecar proxy with SPIFFE identities",
		Long: `meshproxy gives every workload a SPIFFE identity, short-lived certificates that
rotate themselves, and mutual TLS with STRICT/PERMISSIVE enforcement.

Every flag can also be set from the environment as MESHPROXY_<FLAG>, with dashes
as underscores (for example --ca-addr from MESHPROXY_CA_ADDR). Flags win over
the environment.

Exit status: 0 ok, 1 runtime failure, 2 usage error.`,
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRunE: func(cmd *cobra.Command, _ []string) error {
			return applyEnv(cmd)
		},
	}
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return usageError{err} })
	root.AddCommand(
		newVersionCmd(),
		newCACmd(),
		newRunCmd(),
		newGatewayCmd(),
		newRedirectCmd(),
		newIdentityCmd(),
		newPeersCmd(),
		newInspectCmd(),
		newCheckCmd(),
		newInjectCmd(),
		newDemoCmd(),
		newCNICmd(),
		newNodeAgentCmd(),
	)
	wrapArgs(root)
	return root
}

// wrapArgs makes positional-argument errors usage errors, recursively; a
// command group (subcommands, nothing to run itself) given an unknown
// subcommand is a usage error too, and alone prints its help.
func wrapArgs(c *cobra.Command) {
	if c.HasSubCommands() && !c.Runnable() {
		c.Args = cobra.ArbitraryArgs
		c.RunE = func(cmd *cobra.Command, args []string) error {
			if len(args) > 0 {
				return usagef("unknown command %q for %q (see %s --help)", args[0], cmd.CommandPath(), cmd.CommandPath())
			}
			return cmd.Help()
		}
	}
	if c.Args != nil {
		check := c.Args
		c.Args = func(cmd *cobra.Command, args []string) error {
			if err := check(cmd, args); err != nil {
				return usageError{err}
			}
			return nil
		}
	}
	for _, sub := range c.Commands() {
		wrapArgs(sub)
	}
}

// applyEnv sets every flag not given on the command line from MESHPROXY_<FLAG>.
func applyEnv(cmd *cobra.Command) error {
	var errs []error
	cmd.Flags().VisitAll(func(f *pflag.Flag) {
		if f.Changed {
			return
		}
		name := "MESHPROXY_" + strings.ToUpper(strings.ReplaceAll(f.Name, "-", "_"))
		v, ok := os.LookupEnv(name)
		if !ok {
			return
		}
		if err := cmd.Flags().Set(f.Name, v); err != nil {
			errs = append(errs, usagef("%s: invalid value %q for --%s: %v", name, v, f.Name, err))
		}
	})
	return errors.Join(errs...)
}

func newVersionCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print the meshproxy version",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			fmt.Fprintln(cmd.OutOrStdout(), "meshproxy", version)
			return nil
		},
	}
}
