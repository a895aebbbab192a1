// Package gateway is meshproxy's ingress gateway: it accepts traffic from
// outside the mesh on the ports of Istio Gateway resources and sends it to
// mesh services as routed by VirtualServices, at L4.
//
// Per Gateway server (networking.istio.io/v1 Gateway, a subset):
//
//	protocol TCP                 plain TCP in; tcp routes by port → mesh mTLS to the destination
//	tls.mode SIMPLE              TLS terminated with credentialName's certificate; tcp routes → mesh mTLS
//	tls.mode MUTUAL              as SIMPLE, and a client certificate signed by NAME-ca.crt is required
//	tls.mode PASSTHROUGH         SNI sniffed, tls routes by port and sniHosts; the client's TLS forwarded untouched
//	tls.mode ISTIO_MUTUAL        mesh mTLS terminated with the gateway's SVID (east-west); tcp routes → mesh mTLS
//	tls.mode AUTO_PASSTHROUGH    SNI outbound_.PORT_._.HOST: the client's TLS forwarded untouched to HOST:PORT
//
// What the gateway does not serve (HTTP servers, servers whose certificates
// it cannot read, http routes, a route with a subset or without a port) is
// left out with a warning; VirtualServices not bound to its Gateways are
// ignored. Documents are loaded one by one: a rejected one is left out and
// the others apply, unless WithStrictConfig.
//
// Servers sharing a port are told apart by the ClientHello's SNI against
// their hosts (exact names before longer wildcards before "*"); a name no
// server covers is refused and counted, never sent to a default backend.
// Terminated and TCP traffic reaches the mesh with the gateway's own SPIFFE
// identity (tlsmgr.ClientConfig), so STRICT services accept it and their
// AuthorizationPolicies can name the gateway; the destination must present
// a SPIFFE ID listed by a DestinationRule's subjectAltNames for the address
// reached, else any member of the trust domain.
//
// Credentials come from files: NAME.crt (chain, leaf first), NAME.key and,
// for MUTUAL, NAME-ca.crt. The config directory and the credentials are
// watched and reloaded without restart; new connections use the new
// listeners, routes and certificates, open ones carry on. A credential's
// bad change is reported and the last good one stays. Metrics use config names as
// labels (listener port, VirtualService), never client addresses or SNI.
package gateway
