package main

import (
	"errors"

	"github.com/spf13/cobra"
)

// PLACEHOLDER: replaced by the real command.
func newCACmd() *cobra.Command {
	return &cobra.Command{
		Use:    "ca",
		Hidden: true,
		RunE:   func(*cobra.Command, []string) error { return errors.New("ca: not built yet") },
	}
}
