package main

import (
	"errors"

	"github.com/spf13/cobra"
)

// PLACEHOLDER: replaced by the real command.
func newIdentityCmd() *cobra.Command {
	return &cobra.Command{
		Use:    "identity",
		Hidden: true,
		RunE:   func(*cobra.Command, []string) error { return errors.New("identity: not built yet") },
	}
}
