// Package tlsmgr holds a workload's identity: it obtains X.509-SVIDs (from a
// CA by CSR, from mounted files, or from a SPIFFE Workload API), renews them
// before they expire, keeps the trust bundles, and builds crypto/tls configs
// that verify peers by SPIFFE ID. The data plane sees only the Source
// interface and the config builders, never files, CA clients or rotation.
package tlsmgr
