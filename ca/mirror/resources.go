package mirror

// Resource is one Istio custom resource the mirror follows.
type Resource struct {
	Group, Version, Plural, Kind string
}

// Name is the resource as RBAC names it: plural.group.
func (r Resource) Name() string { return r.Plural + "." + r.Group }

// APIVersion is group/version, as in an object's apiVersion.
func (r Resource) APIVersion() string { return r.Group + "/" + r.Version }

// path is the cluster-wide collection URL path.
func (r Resource) path() string { return "/apis/" + r.Group + "/" + r.Version + "/" + r.Plural }

// Resources are the kinds mirrored: what sidecars (PeerAuthentication,
// AuthorizationPolicy, DestinationRule) and gateways (Gateway,
// VirtualService, DestinationRule, AuthorizationPolicy) read.
var Resources = []Resource{
	{Group: "security.istio.io", Version: "v1", Plural: "peerauthentications", Kind: "PeerAuthentication"},
	{Group: "security.istio.io", Version: "v1", Plural: "authorizationpolicies", Kind: "AuthorizationPolicy"},
	{Group: "networking.istio.io", Version: "v1", Plural: "destinationrules", Kind: "DestinationRule"},
	{Group: "networking.istio.io", Version: "v1", Plural: "gateways", Kind: "Gateway"},
	{Group: "networking.istio.io", Version: "v1", Plural: "virtualservices", Kind: "VirtualService"},
}
