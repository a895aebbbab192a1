package gateway

import (
	"encoding/json"

	"github.com/meshproxy/meshproxy/internal/manifest"
)

// The structs below mirror the subset of Istio's networking.istio.io
// Gateway and VirtualService that the gateway reads. Field names are the
// exact JSON names; manifest.Decode refuses anything else, and fields of type
// manifest.Unsupported are refused with their `why`.

// Gateway (networking.istio.io/v1, v1beta1, v1alpha3).
type gatewaySpec struct {
	Selector map[string]string `json:"selector"`
	Servers  []serverSpec      `json:"servers"`
}

type serverSpec struct {
	Port            *portSpec            `json:"port"`
	Hosts           []string             `json:"hosts"`
	TLS             *serverTLSSpec       `json:"tls"`
	Name            string               `json:"name"`
	Bind            manifest.Unsupported `json:"bind" why:"the gateway binds every port on the address given by its own flags"`
	DefaultEndpoint manifest.Unsupported `json:"defaultEndpoint" why:"defaultEndpoint applies to sidecar ingress listeners, not gateways"`
}

type portSpec struct {
	Number     uint32               `json:"number"`
	Protocol   string               `json:"protocol"`
	Name       string               `json:"name"`
	TargetPort manifest.Unsupported `json:"targetPort" why:"the gateway listens on port.number itself"`
}

type serverTLSSpec struct {
	Mode                  string          `json:"mode"`
	CredentialName        string          `json:"credentialName"`
	MinProtocolVersion    string          `json:"minProtocolVersion"`
	MaxProtocolVersion    string          `json:"maxProtocolVersion"`
	HTTPSRedirect         bool            `json:"httpsRedirect"`
	ServerCertificate     string          `json:"serverCertificate"`
	PrivateKey            string          `json:"privateKey"`
	CACertificates        string          `json:"caCertificates"`
	TLSCertificates       json.RawMessage `json:"tlsCertificates"`
	CredentialNames       []string        `json:"credentialNames"`
	CACertCredentialName  string          `json:"caCertCredentialName"`
	CACrl                 string          `json:"caCrl"`
	SubjectAltNames       []string        `json:"subjectAltNames"`
	VerifyCertificateSpki []string        `json:"verifyCertificateSpki"`
	VerifyCertificateHash []string        `json:"verifyCertificateHash"`
	CipherSuites          []string        `json:"cipherSuites"`
	EcdhCurves            []string        `json:"ecdhCurves"`
	InsecureSkipVerify    json.RawMessage `json:"insecureSkipVerify"`
	ALPNProtocols         []string        `json:"alpnProtocols"`
}

// VirtualService (networking.istio.io/v1, v1beta1, v1alpha3), L4 subset.
type virtualServiceSpec struct {
	Hosts    []string        `json:"hosts"`
	Gateways []string        `json:"gateways"`
	TLS      []tlsRouteSpec  `json:"tls"`
	TCP      []tcpRouteSpec  `json:"tcp"`
	ExportTo []string        `json:"exportTo"`
	HTTP     json.RawMessage `json:"http"` // not used: HTTP routes are L7 (a warning when bound)
}

type tlsRouteSpec struct {
	Match []tlsMatchSpec    `json:"match"`
	Route []routeTargetSpec `json:"route"`
}

type tlsMatchSpec struct {
	SNIHosts           []string             `json:"sniHosts"`
	Port               uint32               `json:"port"`
	Gateways           []string             `json:"gateways"`
	DestinationSubnets manifest.Unsupported `json:"destinationSubnets" why:"the gateway matches TLS routes by port and SNI only"`
	SourceLabels       manifest.Unsupported `json:"sourceLabels" why:"source labels select sidecar clients, not gateway clients"`
	SourceNamespace    manifest.Unsupported `json:"sourceNamespace" why:"source namespaces select sidecar clients, not gateway clients"`
}

type tcpRouteSpec struct {
	Match []l4MatchSpec     `json:"match"`
	Route []routeTargetSpec `json:"route"`
}

type l4MatchSpec struct {
	Port               uint32               `json:"port"`
	Gateways           []string             `json:"gateways"`
	DestinationSubnets manifest.Unsupported `json:"destinationSubnets" why:"the gateway matches TCP routes by port only"`
	SourceSubnet       manifest.Unsupported `json:"sourceSubnet" why:"the gateway matches TCP routes by port only"`
	SourceLabels       manifest.Unsupported `json:"sourceLabels" why:"source labels select sidecar clients, not gateway clients"`
	SourceNamespace    manifest.Unsupported `json:"sourceNamespace" why:"source namespaces select sidecar clients, not gateway clients"`
}

type routeTargetSpec struct {
	Destination *destinationSpec `json:"destination"`
	Weight      int32            `json:"weight"`
}

type destinationSpec struct {
	Host   string            `json:"host"`
	Port   *portSelectorSpec `json:"port"`
	Subset string            `json:"subset"` // a route naming one is rejected alone
}

type portSelectorSpec struct {
	Number uint32 `json:"number"`
}
