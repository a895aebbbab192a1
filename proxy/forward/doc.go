// Package forward is the data plane's copy loop: it moves bytes both ways
// between an accepted connection and its upstream with pooled buffers,
// passes a half-close (EOF) on as CloseWrite or a TLS close_notify, and
// aborts a connection that carried nothing for an idle timeout. The sidecar
// (package proxy) and the ingress gateway (package gateway) share it.
package forward
