package main

import (
	"fmt"
	"os"

	"github.com/spf13/cobra"

	"github.com/meshproxy/meshproxy/demo"
)

func newDemoCmd() *cobra.Command {
	var keep bool
	cmd := &cobra.Command{
		Use:   "demo",
		Short: "Run a CA, two sidecars and an echo app on loopback, explained as it runs",
		Long: `demo starts a real meshproxy CA and two real meshproxy sidecars on 127.0.0.1,
with an echo app behind one of them, and walks through what they do: issuing
identities, mesh mTLS between the sidecars, STRICT refusing plaintext,
switching to PERMISSIVE with an Istio PeerAuthentication file, and rotating
certificates with traffic flowing. It needs no root and no network, and
cleans up after itself.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			exe, err := os.Executable()
			if err != nil {
				return fmt.Errorf("find the meshproxy binary: %w", err)
			}
			var opts []demo.Option
			if keep {
				opts = append(opts, demo.WithKeepDir())
			}
			return demo.Run(cmd.Context(), exe, cmd.OutOrStdout(), opts...)
		},
	}
	cmd.Flags().BoolVar(&keep, "keep", false, "keep the scratch directory (CA files, tokens, process logs) and print its path")
	return cmd
}
