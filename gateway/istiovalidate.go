package gateway

import (
	"strings"

	"github.com/meshproxy/meshproxy/internal/manifest"
)

// checkServerTLS applies Istio's validation of a server's certificate
// source, before the gateway decides what it serves: one source at most;
// SIMPLE, MUTUAL and OPTIONAL_MUTUAL without a credential need a server
// certificate and key (and the MUTUAL forms a client CA bundle); a CRL
// neither with credentialName nor with SIMPLE.
func checkServerTLS(path string, t *serverTLSSpec) error {
	mode := strings.ToUpper(t.Mode)
	tlsCerts := !manifest.IsNull(t.TLSCertificates) && strings.TrimSpace(string(t.TLSCertificates)) != "[]"
	sources := 0
	for _, set := range []bool{t.ServerCertificate != "" && t.PrivateKey != "", t.CredentialName != "", len(t.CredentialNames) > 0, tlsCerts} {
		if set {
			sources++
		}
	}
	if sources > 1 {
		return manifest.Errorf(path, "only one of credentialName, credentialNames, serverCertificate/privateKey, tlsCertificates can be set")
	}
	terminating := mode == "SIMPLE" || mode == "MUTUAL" || mode == "OPTIONAL_MUTUAL"
	if terminating && t.CredentialName == "" && len(t.CredentialNames) == 0 {
		if mode != "SIMPLE" && t.CACertificates == "" {
			return manifest.Errorf(path+".caCertificates", "%s without credentialName requires a client CA bundle", mode)
		}
		if !tlsCerts {
			switch {
			case t.ServerCertificate == "":
				return manifest.Errorf(path+".serverCertificate", "%s without credentialName requires a server certificate", mode)
			case t.PrivateKey == "":
				return manifest.Errorf(path+".privateKey", "%s without credentialName requires a private key", mode)
			}
		}
	}
	if t.CACrl != "" {
		switch {
		case t.CredentialName != "":
			return manifest.Errorf(path+".caCrl", "not supported with credentialName: the CRL belongs in the credential")
		case mode == "SIMPLE":
			return manifest.Errorf(path+".caCrl", "not supported with SIMPLE TLS")
		}
	}
	return nil
}

// checkPlainHTTPTLS applies Istio's rule for tls settings on a plain-text
// HTTP server: only an https redirect (PASSTHROUGH without certificates).
func checkPlainHTTPTLS(path string, t *serverTLSSpec) error {
	if t == nil {
		return nil
	}
	mode := strings.ToUpper(t.Mode)
	if (mode != "" && mode != "PASSTHROUGH") || t.CACertificates != "" || t.PrivateKey != "" || t.ServerCertificate != "" {
		return manifest.Errorf(path, "a plain-text HTTP server takes no TLS settings but httpsRedirect")
	}
	return nil
}
