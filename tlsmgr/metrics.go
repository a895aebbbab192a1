package tlsmgr

import (
	"crypto/x509"

	"github.com/meshproxy/meshproxy/metrics"
)

// recordCertMetrics publishes the validity window of the certificate now served.
func recordCertMetrics(leaf *x509.Certificate) {
	metrics.CertNotBefore.Set(float64(leaf.NotBefore.Unix()))
	metrics.CertExpiry.Set(float64(leaf.NotAfter.Unix()))
}
