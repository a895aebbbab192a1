package main

import (
	"errors"

	"github.com/spf13/cobra"
)

// PLACEHOLDER: replaced by the real command.
func newRedirectCmd() *cobra.Command {
	return &cobra.Command{
		Use:    "redirect",
		Hidden: true,
		RunE:   func(*cobra.Command, []string) error { return errors.New("redirect: not built yet") },
	}
}
