// Package remote keeps a sidecar's policy directory in step with the CA's
// Istio config mirror (ca/mirror): it long-polls the config endpoint over
// mTLS with the workload's own SVID, checks that the server is the CA
// (its SPIFFE ID), and writes the documents it receives into the policy
// directory as one file, atomically (write, then rename), only when they
// changed. The policy store's directory watch then loads them, so mirrored
// policy goes through the same loader, validation and reporting as files.
package remote
