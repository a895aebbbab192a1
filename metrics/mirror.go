package metrics

import "github.com/prometheus/client_golang/prometheus"

// Istio config mirror: the CA's copy of the Istio custom resources
// (meshproxy ca serve --mirror-istio-config) and the sidecars that follow it
// (meshproxy run --config-server). The resource label is one of the five
// mirrored kinds; reasons and results are fixed words.
var (
	MirrorSyncErrors = newCounterVec("ca_config_mirror_sync_errors_total",
		"Failed list or watch calls of the CA's Istio config mirror to the API server, by resource and reason (forbidden, not_found, unavailable, bad_response).",
		"resource", "reason")
	MirrorObjects = register(prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Namespace: ns, Name: "ca_config_mirror_objects",
		Help: "Istio objects the CA's config mirror holds now, by resource.",
	}, []string{"resource"}))
	MirrorRequests = newCounterVec("ca_config_mirror_requests_total",
		"Requests to the CA's config mirror endpoint by result (served, not_modified, unauthenticated, forbidden, not_ready, bad_request, too_large).",
		"result")
	ConfigFetches = newCounterVec("config_fetches_total",
		"Fetches of Istio config from --config-server by result (changed, unchanged, failure).",
		"result")
)
