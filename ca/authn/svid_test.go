package authn

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/meshproxy/meshproxy/internal/testpki"
)

func TestSVIDAuthenticatesOwnIdentity(t *testing.T) {
	ca := testpki.New(t, "cluster.local")
	other := testpki.New(t, "cluster.local")
	s := NewSVID(ca.Bundle())
	good := ca.Issue(t, "spiffe://cluster.local/ns/demo/sa/client", time.Hour)
	expired := ca.IssueLeaf(t, testpki.Leaf{ID: "spiffe://cluster.local/ns/demo/sa/client", NotBefore: time.Now().Add(-2 * time.Hour), TTL: time.Hour})
	caLeaf := ca.IssueLeaf(t, testpki.Leaf{ID: "spiffe://cluster.local/ns/demo/sa/client", IsCA: true})
	foreign := other.Issue(t, "spiffe://cluster.local/ns/demo/sa/client", time.Hour)
	tests := []struct {
		name    string
		svid    *x509svid.SVID
		want    string
		wantErr error
	}{
		{"valid svid", good, "spiffe://cluster.local/ns/demo/sa/client", nil},
		{"expired", expired, "", ErrUnauthenticated},
		{"CA certificate as leaf", caLeaf, "", ErrUnauthenticated},
		{"other CA", foreign, "", ErrUnauthenticated},
		{"no certificate", nil, "", ErrNoCredentials},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var c Caller
			if tt.svid != nil {
				c.PeerCertificates = tt.svid.Certificates
			}
			id, err := s.Authenticate(context.Background(), c)
			if tt.wantErr != nil {
				if !errors.Is(err, tt.wantErr) {
					t.Fatalf("err = %v, want %v", err, tt.wantErr)
				}
				return
			}
			if err != nil || id.String() != tt.want {
				t.Fatalf("got %v, %v", id, err)
			}
		})
	}
}
