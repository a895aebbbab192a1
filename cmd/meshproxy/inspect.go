package main

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/meshproxy/meshproxy/internal/fileread"
	"github.com/meshproxy/meshproxy/tlsmgr"
)

func newInspectCmd() *cobra.Command {
	var (
		bundleFile, certFile, keyFile, output, sni string
		alpn                                       []string
		timeout                                    time.Duration
	)
	cmd := &cobra.Command{
		Use:   "inspect HOST:PORT --bundle FILE",
		Short: "Handshake with a mesh peer and print what it presents",
		Long: `inspect opens a TLS 1.3 connection to HOST:PORT offering the mesh ALPN, and
prints the peer's SPIFFE ID, certificate chain, expiry, TLS version and ALPN.
The chain is verified against the roots in --bundle by SPIFFE rules (never by
hostname). No client certificate is needed: a STRICT peer shows its
certificate before it refuses an anonymous client. With --cert and --key the
client presents that SVID and reports whether the peer accepted it.

Exit status is 1 when the peer cannot be reached or its certificate does not
verify against the bundle.`,
		Example: `  meshproxy inspect 127.0.0.1:15006 --bundle root-cert.pem
  meshproxy inspect 10.0.0.7:8080 --bundle root-cert.pem --cert svid.pem --key key.pem -o json`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if bundleFile == "" {
				return usagef("--bundle is required: the PEM file of trusted roots")
			}
			if (certFile == "") != (keyFile == "") {
				return usagef("--cert and --key go together")
			}
			if output != "text" && output != "json" {
				return usagef("--output must be text or json, not %q", output)
			}
			if _, _, err := net.SplitHostPort(args[0]); err != nil {
				return usagef("address %q: want HOST:PORT: %v", args[0], err)
			}
			roots, err := loadPEMCerts(bundleFile)
			if err != nil {
				return err
			}
			var client *tls.Certificate
			if certFile != "" {
				c, err := tls.LoadX509KeyPair(certFile, keyFile)
				if err != nil {
					return fmt.Errorf("load --cert %s / --key %s: %w", certFile, keyFile, err)
				}
				client = &c
			}
			res, err := tlsmgr.Inspect(cmd.Context(), args[0], roots, tlsmgr.InspectOptions{Client: client, ALPN: alpn, SNI: sni, Timeout: timeout})
			if err != nil {
				return err
			}
			if err := printInspect(cmd.OutOrStdout(), res, output); err != nil {
				return err
			}
			if !res.Verified {
				return fmt.Errorf("peer %s: certificate does not verify against %s: %s", args[0], bundleFile, res.VerifyError)
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&bundleFile, "bundle", "", "PEM file with the trusted root certificates (required)")
	f.StringVar(&certFile, "cert", "", "PEM certificate chain to present as the client (optional)")
	f.StringVar(&keyFile, "key", "", "PEM private key for --cert")
	f.StringVarP(&output, "output", "o", "text", "output format: text or json")
	f.StringSliceVar(&alpn, "alpn", []string{tlsmgr.ALPNIstio}, "ALPN protocols to offer")
	f.StringVar(&sni, "sni", "", "SNI to send (default none)")
	f.DurationVar(&timeout, "timeout", tlsmgr.DefaultInspectTimeout, "connect and handshake timeout")
	return cmd
}

func printInspect(w io.Writer, r *tlsmgr.PeerReport, output string) error {
	if output == "json" {
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(r)
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "Peer:\t%s\n", r.Address)
	fmt.Fprintf(tw, "SPIFFE ID:\t%s\n", orNone(r.SPIFFEID))
	if r.Verified {
		fmt.Fprintf(tw, "Verified:\tyes (chains to the bundle)\n")
	} else {
		fmt.Fprintf(tw, "Verified:\tNO: %s\n", r.VerifyError)
	}
	fmt.Fprintf(tw, "TLS:\t%s, %s\n", r.TLSVersion, r.CipherSuite)
	fmt.Fprintf(tw, "ALPN:\t%s\n", orNone(r.ALPN))
	fmt.Fprintf(tw, "Expires:\t%s (in %s)\n", r.NotAfter.UTC().Format(time.RFC3339), (time.Duration(r.ExpiresIn) * time.Second).String())
	if r.ClientCertOK != nil {
		fmt.Fprintf(tw, "Client cert:\t%s\n", map[bool]string{true: "accepted", false: "refused by the peer"}[*r.ClientCertOK])
	}
	fmt.Fprintln(tw, "Chain:")
	for i, c := range r.Chain {
		sans := strings.Join(append(append([]string{}, c.URIs...), c.DNSNames...), ", ")
		fmt.Fprintf(tw, "  [%d]\t%s  serial %s  CA=%t\n", i, c.Subject, c.Serial, c.IsCA)
		fmt.Fprintf(tw, "   \tissuer %s  valid %s → %s\n", c.Issuer, c.NotBefore.UTC().Format(time.RFC3339), c.NotAfter.UTC().Format(time.RFC3339))
		if sans != "" {
			fmt.Fprintf(tw, "   \tSANs %s\n", sans)
		}
	}
	return tw.Flush()
}

func orNone(s string) string {
	if s == "" {
		return "(none)"
	}
	return s
}

// loadPEMCerts reads every certificate of a PEM file.
func loadPEMCerts(path string) ([]*x509.Certificate, error) {
	data, err := fileread.Read(path, fileread.MaxPEM)
	if err != nil {
		return nil, fmt.Errorf("read %w", err)
	}
	certs, err := tlsmgr.ParseCertificatesPEM(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return certs, nil
}
