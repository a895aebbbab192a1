package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/meshproxy/meshproxy/internal/ports"
	"github.com/meshproxy/meshproxy/proxy/admin"
	"github.com/meshproxy/meshproxy/proxy/conntrack"
)

func newIdentityCmd() *cobra.Command {
	var adminAddr, output string
	var bundle bool
	cmd := &cobra.Command{
		Use:   "identity",
		Short: "Show the sidecar's own SVID: SPIFFE ID, serial, validity, chain, bundle",
		Long: `identity asks a running sidecar's admin API (127.0.0.1:15000 by default) which
identity it holds: SPIFFE ID, certificate serial, validity, the trust domains
it trusts, and where the identity comes from (CA, files, Workload API).
-o pem prints the certificate chain (with --bundle: the trusted roots), never
the private key.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if output != "text" && output != "json" && output != "pem" {
				return usagef("--output must be text, json or pem, not %q", output)
			}
			body, err := adminGet(cmd.Context(), adminAddr, "/identity")
			if err != nil {
				return err
			}
			var id admin.Identity
			if err := json.Unmarshal(body, &id); err != nil {
				return fmt.Errorf("admin %s/identity: decode: %w", adminAddr, err)
			}
			w := cmd.OutOrStdout()
			switch output {
			case "json":
				_, err = w.Write(append(body, '\n'))
				return err
			case "pem":
				if bundle {
					_, err = io.WriteString(w, id.BundlePEM)
				} else {
					_, err = io.WriteString(w, id.ChainPEM)
				}
				return err
			}
			tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
			fmt.Fprintf(tw, "SPIFFE ID:\t%s\n", id.SPIFFEID)
			fmt.Fprintf(tw, "Serial:\t%s\n", id.Serial)
			fmt.Fprintf(tw, "Not before:\t%s\n", id.NotBefore.UTC().Format(time.RFC3339))
			fmt.Fprintf(tw, "Not after:\t%s (expires in %s)\n", id.NotAfter.UTC().Format(time.RFC3339), time.Duration(id.ExpiresInSeconds)*time.Second)
			fmt.Fprintf(tw, "Trust domains:\t%s\n", strings.Join(id.TrustDomains, ", "))
			fmt.Fprintf(tw, "Source:\t%s\n", id.Source)
			fmt.Fprintf(tw, "Chain:\t%d certificates (-o pem to print)\n", strings.Count(id.ChainPEM, "BEGIN CERTIFICATE"))
			fmt.Fprintf(tw, "Bundle:\t%d trusted roots (-o pem --bundle to print)\n", strings.Count(id.BundlePEM, "BEGIN CERTIFICATE"))
			return tw.Flush()
		},
	}
	cmd.Flags().StringVar(&adminAddr, "admin", ports.Loopback(ports.Admin), "address of the sidecar's admin API")
	cmd.Flags().StringVarP(&output, "output", "o", "text", "output format: text, json or pem")
	cmd.Flags().BoolVar(&bundle, "bundle", false, "with -o pem: print the trust bundle instead of the chain")
	return cmd
}

func newPeersCmd() *cobra.Command {
	var adminAddr, output string
	cmd := &cobra.Command{
		Use:   "peers",
		Short: "List the sidecar's live connections with each peer's SPIFFE ID, mode and bytes",
		Long: `peers asks a running sidecar's admin API for its open connections: direction,
source and destination addresses, the peer's SPIFFE ID (empty for plaintext or
passed-through connections), the mode (hbone: a stream of a pooled mesh
connection; mtls: a mesh connection of its own; tls, plaintext, passthrough),
when it started and the bytes moved each way.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if output != "text" && output != "json" {
				return usagef("--output must be text or json, not %q", output)
			}
			body, err := adminGet(cmd.Context(), adminAddr, "/peers")
			if err != nil {
				return err
			}
			var peers []conntrack.PeerInfo
			if err := json.Unmarshal(body, &peers); err != nil {
				return fmt.Errorf("admin %s/peers: decode: %w", adminAddr, err)
			}
			w := cmd.OutOrStdout()
			if output == "json" {
				_, err = w.Write(append(body, '\n'))
				return err
			}
			tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "DIRECTION\tSOURCE\tDESTINATION\tPEER\tMODE\tAGE\tBYTES IN\tBYTES OUT")
			for _, p := range peers {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%d\t%d\n", p.Direction, p.Source, p.Destination,
					orDash(p.PeerSPIFFEID), p.Mode, time.Since(p.Since).Round(time.Second), p.BytesIn, p.BytesOut)
			}
			if len(peers) == 0 {
				fmt.Fprintln(tw, "(no open connections)")
			}
			return tw.Flush()
		},
	}
	cmd.Flags().StringVar(&adminAddr, "admin", ports.Loopback(ports.Admin), "address of the sidecar's admin API")
	cmd.Flags().StringVarP(&output, "output", "o", "text", "output format: text or json")
	return cmd
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// adminGet fetches path from a sidecar's admin API.
func adminGet(ctx context.Context, addr, path string) ([]byte, error) {
	return adminDo(ctx, http.MethodGet, addr, path)
}

func adminDo(ctx context.Context, method, addr, path string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, method, "http://"+addr+path, nil)
	if err != nil {
		return nil, usagef("--admin %q: %v", addr, err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, fmt.Errorf("admin API at %s: %w (is the sidecar running? set --admin)", addr, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return nil, fmt.Errorf("admin %s%s: read: %w", addr, path, err)
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("admin %s%s: %s: %s", addr, path, resp.Status, strings.TrimSpace(string(body)))
	}
	return body, nil
}
