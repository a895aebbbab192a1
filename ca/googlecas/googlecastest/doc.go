// Package googlecastest is a fake Google Certificate Authority Service for
// tests: the real google.cloud.security.privateca.v1 gRPC service (the
// published protos) over TLS on loopback, serving one CA pool. It checks
// every call's credentials the way Google does for a service account's
// self-signed JWT (Application Default Credentials from a key file), signs
// with a real key from internal/testpki, and injects the failures the
// service is known for: quota exhaustion, unavailability, a template that
// drops the URI SAN, errors of any code.
package googlecastest
