package main

import (
	"errors"

	"github.com/spf13/cobra"
)

// PLACEHOLDER: replaced by the real command.
func newPeersCmd() *cobra.Command {
	return &cobra.Command{
		Use:    "peers",
		Hidden: true,
		RunE:   func(*cobra.Command, []string) error { return errors.New("peers: not built yet") },
	}
}
