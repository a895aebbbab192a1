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
	Mode                  string               `json:"mode"`
	CredentialName        string               `json:"credentialName"`
	MinProtocolVersion    string               `json:"minProtocolVersion"`
	MaxProtocolVersion    string               `json:"maxProtocolVersion"`
	HTTPSRedirect         manifest.Unsupported `json:"httpsRedirect" why:"HTTP redirects are L7; the gateway forwards at L4"`
	ServerCertificate     manifest.Unsupported `json:"serverCertificate" why:"certificate file paths are not read; use credentialName with files in --credentials-dir"`
	PrivateKey            manifest.Unsupported `json:"privateKey" why:"certificate file paths are not read; use credentialName with files in --credentials-dir"`
	CACertificates        manifest.Unsupported `json:"caCertificates" why:"certificate file paths are not read; use credentialName with files in --credentials-dir"`
	TLSCertificates       manifest.Unsupported `json:"tlsCertificates" why:"certificate file paths are not read; use credentialName with files in --credentials-dir"`
	CredentialNames       manifest.Unsupported `json:"credentialNames" why:"one credentialName per server is supported"`
	CACertCredentialName  manifest.Unsupported `json:"caCertCredentialName" why:"the client CA is read from NAME-ca.crt beside the credentialName's files"`
	CACrl                 manifest.Unsupported `json:"caCrl" why:"certificate revocation lists are not supported"`
	SubjectAltNames       manifest.Unsupported `json:"subjectAltNames" why:"MUTUAL accepts any client certificate from the CA in NAME-ca.crt"`
	VerifyCertificateSpki manifest.Unsupported `json:"verifyCertificateSpki" why:"certificate pinning is not supported"`
	VerifyCertificateHash manifest.Unsupported `json:"verifyCertificateHash" why:"certificate pinning is not supported"`
	CipherSuites          manifest.Unsupported `json:"cipherSuites" why:"cipher suites are Go's defaults"`
	EcdhCurves            manifest.Unsupported `json:"ecdhCurves" why:"key exchange groups are Go's defaults"`
	InsecureSkipVerify    manifest.Unsupported `json:"insecureSkipVerify" why:"MUTUAL always verifies client certificates"`
	ALPNProtocols         manifest.Unsupported `json:"alpnProtocols" why:"the gateway forwards at L4 and negotiates no ALPN"`
}

// VirtualService (networking.istio.io/v1, v1beta1, v1alpha3), L4 subset.
type virtualServiceSpec struct {
	Hosts    []string        `json:"hosts"`
	Gateways []string        `json:"gateways"`
	TLS      []tlsRouteSpec  `json:"tls"`
	TCP      []tcpRouteSpec  `json:"tcp"`
	ExportTo []string        `json:"exportTo"`
	HTTP     json.RawMessage `json:"http"` // refused only if the service binds to one of our Gateways
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
	Host   string               `json:"host"`
	Port   *portSelectorSpec    `json:"port"`
	Subset manifest.Unsupported `json:"subset" why:"subsets select endpoints by label, which the gateway does not know; route to a host that reaches them"`
}

type portSelectorSpec struct {
	Number uint32 `json:"number"`
}
