package policy

import (
	"encoding/json"
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

// AuthorizationPolicy (security.istio.io/v1, v1beta1): every field of the
// API is read; compileAuthz decides what each means for TCP traffic.
type authzSpec struct {
	Selector   *workloadSelector `json:"selector"`
	TargetRef  json.RawMessage   `json:"targetRef"`
	TargetRefs []json.RawMessage `json:"targetRefs"`
	Action     string            `json:"action"`
	Provider   *authzProvider    `json:"provider"`
	Rules      []*authzRule      `json:"rules"`
}

type authzProvider struct {
	Name string `json:"name"`
}

type authzRule struct {
	From []*authzFrom      `json:"from"`
	To   []*authzTo        `json:"to"`
	When []*authzCondition `json:"when"`
}

type authzFrom struct {
	Source *authzSource `json:"source"`
}

type authzTo struct {
	Operation *authzOperation `json:"operation"`
}

type authzSource struct {
	Principals           []string `json:"principals"`
	NotPrincipals        []string `json:"notPrincipals"`
	RequestPrincipals    []string `json:"requestPrincipals"`
	NotRequestPrincipals []string `json:"notRequestPrincipals"`
	Namespaces           []string `json:"namespaces"`
	NotNamespaces        []string `json:"notNamespaces"`
	ServiceAccounts      []string `json:"serviceAccounts"`
	NotServiceAccounts   []string `json:"notServiceAccounts"`
	TrustDomains         []string `json:"trustDomains"`
	NotTrustDomains      []string `json:"notTrustDomains"`
	IPBlocks             []string `json:"ipBlocks"`
	NotIPBlocks          []string `json:"notIpBlocks"`
	RemoteIPBlocks       []string `json:"remoteIpBlocks"`
	NotRemoteIPBlocks    []string `json:"notRemoteIpBlocks"`
}

type authzOperation struct {
	Ports      []portString `json:"ports"`
	NotPorts   []portString `json:"notPorts"`
	Hosts      []string     `json:"hosts"`
	NotHosts   []string     `json:"notHosts"`
	Methods    []string     `json:"methods"`
	NotMethods []string     `json:"notMethods"`
	Paths      []string     `json:"paths"`
	NotPaths   []string     `json:"notPaths"`
}

type authzCondition struct {
	Key       string   `json:"key"`
	Values    []string `json:"values"`
	NotValues []string `json:"notValues"`
}

// portString is an AuthorizationPolicy port: Istio's API types it as a
// string ("8080"); a bare YAML integer is accepted too. It is checked when
// the policy is compiled, so the error names the field.
type portString string

func (p *portString) UnmarshalJSON(b []byte) error {
	s := strings.TrimSpace(string(b))
	if uq, err := strconv.Unquote(s); err == nil {
		s = uq
	} else if _, err := strconv.ParseUint(s, 10, 64); err != nil {
		return fmt.Errorf("want a port number, got %s", b)
	}
	*p = portString(s)
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
	TLS               *clientTLS          `json:"tls"`
	PortLevelSettings []portTrafficPolicy `json:"portLevelSettings"`
	LoadBalancer      json.RawMessage     `json:"loadBalancer"`
	ConnectionPool    *connectionPool     `json:"connectionPool"`
	OutlierDetection  json.RawMessage     `json:"outlierDetection"`
	Tunnel            json.RawMessage     `json:"tunnel"`
	ProxyProtocol     json.RawMessage     `json:"proxyProtocol"`
	RetryBudget       json.RawMessage     `json:"retryBudget"`
}

type portTrafficPolicy struct {
	Port             *portSelector   `json:"port"`
	TLS              *clientTLS      `json:"tls"`
	LoadBalancer     json.RawMessage `json:"loadBalancer"`
	ConnectionPool   *connectionPool `json:"connectionPool"`
	OutlierDetection json.RawMessage `json:"outlierDetection"`
}

type connectionPool struct {
	TCP  json.RawMessage `json:"tcp"`
	HTTP json.RawMessage `json:"http"`
}

type portSelector struct {
	Number uint32 `json:"number"`
}

type clientTLS struct {
	Mode               string          `json:"mode"`
	SubjectAltNames    []string        `json:"subjectAltNames"`
	ClientCertificate  string          `json:"clientCertificate"`
	PrivateKey         string          `json:"privateKey"`
	CACertificates     string          `json:"caCertificates"`
	CACrl              string          `json:"caCrl"`
	CredentialName     string          `json:"credentialName"`
	SNI                string          `json:"sni"`
	InsecureSkipVerify json.RawMessage `json:"insecureSkipVerify"`
}

// destRuleSubset is read for its name (routing targets of VirtualServices,
// which a sidecar does not route); its labels and traffic policy need
// endpoint labels meshproxy does not know, and are ignored with a warning.
type destRuleSubset struct {
	Name          string           `json:"name"`
	Labels        manifest.Ignored `json:"labels"`
	TrafficPolicy json.RawMessage  `json:"trafficPolicy"`
}
