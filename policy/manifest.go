package policy

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/meshproxy/meshproxy/internal/manifest"
)

// The structs below mirror the subset of Istio's CRDs meshproxy reads. Field
// names are the exact JSON names; manifest.Decode refuses anything else, and
// fields of type manifest.Unsupported are refused with their `why`. The
// object envelope and metadata are manifest.Object and manifest.Metadata.

type workloadSelector struct {
	MatchLabels map[string]string `json:"matchLabels"`
}

// labels returns the selector's labels, nil for none: as in Istio, an absent
// or empty selector selects the whole namespace.
func (s *workloadSelector) labels() map[string]string {
	if s == nil || len(s.MatchLabels) == 0 {
		return nil
	}
	return s.MatchLabels
}

// PeerAuthentication (security.istio.io/v1, v1beta1).
type peerAuthSpec struct {
	Selector      *workloadSelector       `json:"selector"`
	Mtls          *peerAuthMTLS           `json:"mtls"`
	PortLevelMtls map[string]peerAuthMTLS `json:"portLevelMtls"`
}

type peerAuthMTLS struct {
	Mode string `json:"mode"`
}

// AuthorizationPolicy (security.istio.io/v1, v1beta1), L4 subset.
type authzSpec struct {
	Selector   *workloadSelector    `json:"selector"`
	TargetRef  manifest.Unsupported `json:"targetRef" why:"targetRef(s) attach policy to gateways and waypoints, not sidecars; use selector"`
	TargetRefs manifest.Unsupported `json:"targetRefs" why:"targetRef(s) attach policy to gateways and waypoints, not sidecars; use selector"`
	Action     string               `json:"action"`
	Provider   manifest.Unsupported `json:"provider" why:"CUSTOM (external) authorization"`
	Rules      []authzRule          `json:"rules"`
}

type authzRule struct {
	From []authzFrom          `json:"from"`
	To   []authzTo            `json:"to"`
	When manifest.Unsupported `json:"when" why:"conditions are L7 (request) attributes; meshproxy enforces L4 only"`
}

type authzFrom struct {
	Source *authzSource `json:"source"`
}

type authzTo struct {
	Operation *authzOperation `json:"operation"`
}

type authzSource struct {
	Principals           []string             `json:"principals"`
	NotPrincipals        []string             `json:"notPrincipals"`
	Namespaces           []string             `json:"namespaces"`
	NotNamespaces        []string             `json:"notNamespaces"`
	RequestPrincipals    manifest.Unsupported `json:"requestPrincipals" why:"request principals come from JWTs (L7); meshproxy enforces L4 only"`
	NotRequestPrincipals manifest.Unsupported `json:"notRequestPrincipals" why:"request principals come from JWTs (L7); meshproxy enforces L4 only"`
	IPBlocks             manifest.Unsupported `json:"ipBlocks" why:"IP blocks need the peer address, which meshproxy does not authorize on"`
	NotIPBlocks          manifest.Unsupported `json:"notIpBlocks" why:"IP blocks need the peer address, which meshproxy does not authorize on"`
	RemoteIPBlocks       manifest.Unsupported `json:"remoteIpBlocks" why:"remote IP blocks come from X-Forwarded-For (L7); meshproxy enforces L4 only"`
	NotRemoteIPBlocks    manifest.Unsupported `json:"notRemoteIpBlocks" why:"remote IP blocks come from X-Forwarded-For (L7); meshproxy enforces L4 only"`
	ServiceAccounts      manifest.Unsupported `json:"serviceAccounts" why:"use principals (cluster.local/ns/NS/sa/SA) instead"`
	NotServiceAccounts   manifest.Unsupported `json:"notServiceAccounts" why:"use notPrincipals (cluster.local/ns/NS/sa/SA) instead"`
}

type authzOperation struct {
	Ports      []portValue          `json:"ports"`
	NotPorts   []portValue          `json:"notPorts"`
	Hosts      manifest.Unsupported `json:"hosts" why:"L7 (request) attribute; meshproxy enforces L4 only"`
	NotHosts   manifest.Unsupported `json:"notHosts" why:"L7 (request) attribute; meshproxy enforces L4 only"`
	Methods    manifest.Unsupported `json:"methods" why:"L7 (request) attribute; meshproxy enforces L4 only"`
	NotMethods manifest.Unsupported `json:"notMethods" why:"L7 (request) attribute; meshproxy enforces L4 only"`
	Paths      manifest.Unsupported `json:"paths" why:"L7 (request) attribute; meshproxy enforces L4 only"`
	NotPaths   manifest.Unsupported `json:"notPaths" why:"L7 (request) attribute; meshproxy enforces L4 only"`
}

// portValue is a port number written as Istio does ("8080") or as a bare
// YAML integer.
type portValue uint16

func (p *portValue) UnmarshalJSON(b []byte) error {
	s := strings.TrimSpace(string(b))
	if uq, err := strconv.Unquote(s); err == nil {
		s = uq
	}
	n, err := strconv.ParseUint(s, 10, 16)
	if err != nil || n == 0 {
		return fmt.Errorf("want a port number 1-65535, got %s", b)
	}
	*p = portValue(n)
	return nil
}

// DestinationRule (networking.istio.io/v1, v1beta1, v1alpha3), TLS subset.
type destRuleSpec struct {
	Host             string            `json:"host"`
	TrafficPolicy    *trafficPolicy    `json:"trafficPolicy"`
	Subsets          []destRuleSubset  `json:"subsets"`
	ExportTo         []string          `json:"exportTo"`
	WorkloadSelector *workloadSelector `json:"workloadSelector"`
}

type trafficPolicy struct {
	TLS               *clientTLS           `json:"tls"`
	PortLevelSettings []portTrafficPolicy  `json:"portLevelSettings"`
	LoadBalancer      manifest.Unsupported `json:"loadBalancer" why:"load balancing and connection management are not done by meshproxy (it forwards to the original destination)"`
	ConnectionPool    manifest.Unsupported `json:"connectionPool" why:"load balancing and connection management are not done by meshproxy (it forwards to the original destination)"`
	OutlierDetection  manifest.Unsupported `json:"outlierDetection" why:"load balancing and connection management are not done by meshproxy (it forwards to the original destination)"`
	Tunnel            manifest.Unsupported `json:"tunnel" why:"tunnel settings are not supported"`
	ProxyProtocol     manifest.Unsupported `json:"proxyProtocol" why:"PROXY protocol is not supported"`
	RetryBudget       manifest.Unsupported `json:"retryBudget" why:"retries are L7"`
}

type portTrafficPolicy struct {
	Port             *portSelector        `json:"port"`
	TLS              *clientTLS           `json:"tls"`
	LoadBalancer     manifest.Unsupported `json:"loadBalancer" why:"load balancing and connection management are not done by meshproxy (it forwards to the original destination)"`
	ConnectionPool   manifest.Unsupported `json:"connectionPool" why:"load balancing and connection management are not done by meshproxy (it forwards to the original destination)"`
	OutlierDetection manifest.Unsupported `json:"outlierDetection" why:"load balancing and connection management are not done by meshproxy (it forwards to the original destination)"`
}

type portSelector struct {
	Number uint32 `json:"number"`
}

type clientTLS struct {
	Mode               string               `json:"mode"`
	SubjectAltNames    []string             `json:"subjectAltNames"`
	ClientCertificate  manifest.Unsupported `json:"clientCertificate" why:"only ISTIO_MUTUAL and DISABLE are supported; TLS origination with own certificates is not"`
	PrivateKey         manifest.Unsupported `json:"privateKey" why:"only ISTIO_MUTUAL and DISABLE are supported; TLS origination with own certificates is not"`
	CACertificates     manifest.Unsupported `json:"caCertificates" why:"only ISTIO_MUTUAL and DISABLE are supported; TLS origination with own certificates is not"`
	CACrl              manifest.Unsupported `json:"caCrl" why:"only ISTIO_MUTUAL and DISABLE are supported; TLS origination with own certificates is not"`
	CredentialName     manifest.Unsupported `json:"credentialName" why:"only ISTIO_MUTUAL and DISABLE are supported; TLS origination with own certificates is not"`
	SNI                manifest.Unsupported `json:"sni" why:"meshproxy chooses the mesh SNI itself"`
	InsecureSkipVerify manifest.Unsupported `json:"insecureSkipVerify" why:"peers are always verified by SPIFFE ID"`
}

// destRuleSubset is accepted for its name and labels (routing targets of
// VirtualServices, which a sidecar does not route); a per-subset traffic
// policy would need endpoint labels and is refused.
type destRuleSubset struct {
	Name          string               `json:"name"`
	Labels        manifest.Ignored     `json:"labels"`
	TrafficPolicy manifest.Unsupported `json:"trafficPolicy" why:"per-subset policies need endpoint labels, which meshproxy does not know"`
}
