package main

import (
	"errors"

	"github.com/spf13/cobra"
)

// PLACEHOLDER: replaced by the real command.
func newInspectCmd() *cobra.Command {
	return &cobra.Command{
		Use:    "inspect",
		Hidden: true,
		RunE:   func(*cobra.Command, []string) error { return errors.New("inspect: not built yet") },
	}
}
