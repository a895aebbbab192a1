package main

import (
	"errors"

	"github.com/spf13/cobra"
)

// PLACEHOLDER: replaced by the real command.
func newInjectCmd() *cobra.Command {
	return &cobra.Command{
		Use:    "inject",
		Hidden: true,
		RunE:   func(*cobra.Command, []string) error { return errors.New("inject: not built yet") },
	}
}
