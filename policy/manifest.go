package policy

import (
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// The structs below mirror the subset of Istio's CRDs meshproxy reads. Field
// names are the exact JSON names; decodeStrict refuses anything else, and
// fields of type unsupported are refused with their `why`.

// header is decoded leniently first, to route a document by kind.
type header struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
}

// object is a Kubernetes object of one of the supported kinds.
type object[S any] struct {
	APIVersion string   `json:"apiVersion"`
	Kind       string   `json:"kind"`
	Metadata   metadata `json:"metadata"`
	Spec       S        `json:"spec"`
	Status     ignored  `json:"status"`
}

// metadata is Kubernetes ObjectMeta: name, namespace and creationTimestamp
// are used, the rest is accepted so `kubectl get -o yaml` output loads, and a
// misspelt key (namepsace) is still an error.
type metadata struct {
	Name                       string  `json:"name"`
	Namespace                  string  `json:"namespace"`
	CreationTimestamp          k8sTime `json:"creationTimestamp"`
	GenerateName               ignored `json:"generateName"`
	SelfLink                   ignored `json:"selfLink"`
	UID                        ignored `json:"uid"`
	ResourceVersion            ignored `json:"resourceVersion"`
	Generation                 ignored `json:"generation"`
	DeletionTimestamp          ignored `json:"deletionTimestamp"`
	DeletionGracePeriodSeconds ignored `json:"deletionGracePeriodSeconds"`
	Labels                     ignored `json:"labels"`
	Annotations                ignored `json:"annotations"`
	OwnerReferences            ignored `json:"ownerReferences"`
	Finalizers                 ignored `json:"finalizers"`
	ManagedFields              ignored `json:"managedFields"`
}

// k8sTime is an RFC 3339 timestamp as Kubernetes writes it.
type k8sTime struct{ time.Time }

func (t *k8sTime) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return fmt.Errorf("want an RFC 3339 timestamp string")
	}
	if s == "" {
		return nil
	}
	v, err := time.Parse(time.RFC3339, s)
	if err != nil {
		return fmt.Errorf("want an RFC 3339 timestamp: %q", s)
	}
	t.Time = v
	return nil
}

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
	Selector   *workloadSelector `json:"selector"`
	TargetRef  unsupported       `json:"targetRef" why:"targetRef(s) attach policy to gateways and waypoints, not sidecars; use selector"`
	TargetRefs unsupported       `json:"targetRefs" why:"targetRef(s) attach policy to gateways and waypoints, not sidecars; use selector"`
	Action     string            `json:"action"`
	Provider   unsupported       `json:"provider" why:"CUSTOM (external) authorization"`
	Rules      []authzRule       `json:"rules"`
}

type authzRule struct {
	From []authzFrom `json:"from"`
	To   []authzTo   `json:"to"`
	When unsupported `json:"when" why:"conditions are L7 (request) attributes; meshproxy enforces L4 only"`
}

type authzFrom struct {
	Source *authzSource `json:"source"`
}

type authzTo struct {
	Operation *authzOperation `json:"operation"`
}

type authzSource struct {
	Principals           []string    `json:"principals"`
	NotPrincipals        []string    `json:"notPrincipals"`
	Namespaces           []string    `json:"namespaces"`
	NotNamespaces        []string    `json:"notNamespaces"`
	RequestPrincipals    unsupported `json:"requestPrincipals" why:"request principals come from JWTs (L7); meshproxy enforces L4 only"`
	NotRequestPrincipals unsupported `json:"notRequestPrincipals" why:"request principals come from JWTs (L7); meshproxy enforces L4 only"`
	IPBlocks             unsupported `json:"ipBlocks" why:"IP blocks need the peer address, which meshproxy does not authorize on"`
	NotIPBlocks          unsupported `json:"notIpBlocks" why:"IP blocks need the peer address, which meshproxy does not authorize on"`
	RemoteIPBlocks       unsupported `json:"remoteIpBlocks" why:"remote IP blocks come from X-Forwarded-For (L7); meshproxy enforces L4 only"`
	NotRemoteIPBlocks    unsupported `json:"notRemoteIpBlocks" why:"remote IP blocks come from X-Forwarded-For (L7); meshproxy enforces L4 only"`
	ServiceAccounts      unsupported `json:"serviceAccounts" why:"use principals (cluster.local/ns/NS/sa/SA) instead"`
	NotServiceAccounts   unsupported `json:"notServiceAccounts" why:"use notPrincipals (cluster.local/ns/NS/sa/SA) instead"`
}

type authzOperation struct {
	Ports      []portValue `json:"ports"`
	NotPorts   []portValue `json:"notPorts"`
	Hosts      unsupported `json:"hosts" why:"L7 (request) attribute; meshproxy enforces L4 only"`
	NotHosts   unsupported `json:"notHosts" why:"L7 (request) attribute; meshproxy enforces L4 only"`
	Methods    unsupported `json:"methods" why:"L7 (request) attribute; meshproxy enforces L4 only"`
	NotMethods unsupported `json:"notMethods" why:"L7 (request) attribute; meshproxy enforces L4 only"`
	Paths      unsupported `json:"paths" why:"L7 (request) attribute; meshproxy enforces L4 only"`
	NotPaths   unsupported `json:"notPaths" why:"L7 (request) attribute; meshproxy enforces L4 only"`
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
	TLS               *clientTLS          `json:"tls"`
	PortLevelSettings []portTrafficPolicy `json:"portLevelSettings"`
	LoadBalancer      unsupported         `json:"loadBalancer" why:"load balancing and connection management are not done by meshproxy (it forwards to the original destination)"`
	ConnectionPool    unsupported         `json:"connectionPool" why:"load balancing and connection management are not done by meshproxy (it forwards to the original destination)"`
	OutlierDetection  unsupported         `json:"outlierDetection" why:"load balancing and connection management are not done by meshproxy (it forwards to the original destination)"`
	Tunnel            unsupported         `json:"tunnel" why:"tunnel settings are not supported"`
	ProxyProtocol     unsupported         `json:"proxyProtocol" why:"PROXY protocol is not supported"`
	RetryBudget       unsupported         `json:"retryBudget" why:"retries are L7"`
}

type portTrafficPolicy struct {
	Port             *portSelector `json:"port"`
	TLS              *clientTLS    `json:"tls"`
	LoadBalancer     unsupported   `json:"loadBalancer" why:"load balancing and connection management are not done by meshproxy (it forwards to the original destination)"`
	ConnectionPool   unsupported   `json:"connectionPool" why:"load balancing and connection management are not done by meshproxy (it forwards to the original destination)"`
	OutlierDetection unsupported   `json:"outlierDetection" why:"load balancing and connection management are not done by meshproxy (it forwards to the original destination)"`
}

type portSelector struct {
	Number uint32 `json:"number"`
}

type clientTLS struct {
	Mode               string      `json:"mode"`
	SubjectAltNames    []string    `json:"subjectAltNames"`
	ClientCertificate  unsupported `json:"clientCertificate" why:"only ISTIO_MUTUAL and DISABLE are supported; TLS origination with own certificates is not"`
	PrivateKey         unsupported `json:"privateKey" why:"only ISTIO_MUTUAL and DISABLE are supported; TLS origination with own certificates is not"`
	CACertificates     unsupported `json:"caCertificates" why:"only ISTIO_MUTUAL and DISABLE are supported; TLS origination with own certificates is not"`
	CACrl              unsupported `json:"caCrl" why:"only ISTIO_MUTUAL and DISABLE are supported; TLS origination with own certificates is not"`
	CredentialName     unsupported `json:"credentialName" why:"only ISTIO_MUTUAL and DISABLE are supported; TLS origination with own certificates is not"`
	SNI                unsupported `json:"sni" why:"meshproxy chooses the mesh SNI itself"`
	InsecureSkipVerify unsupported `json:"insecureSkipVerify" why:"peers are always verified by SPIFFE ID"`
}

// destRuleSubset is accepted for its name and labels (routing targets of
// VirtualServices, which a sidecar does not route); a per-subset traffic
// policy would need endpoint labels and is refused.
type destRuleSubset struct {
	Name          string      `json:"name"`
	Labels        ignored     `json:"labels"`
	TrafficPolicy unsupported `json:"trafficPolicy" why:"per-subset policies need endpoint labels, which meshproxy does not know"`
}
