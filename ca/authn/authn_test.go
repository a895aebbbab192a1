package authn

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

type fixed struct {
	name string
	id   string
	err  error
}

func (f fixed) Name() string { return f.name }
func (f fixed) Authenticate(context.Context, Caller) (spiffeid.ID, error) {
	if f.err != nil {
		return spiffeid.ID{}, f.err
	}
	return spiffeid.RequireFromString(f.id), nil
}

func TestChainTriesInOrderAndReportsTheMostTellingError(t *testing.T) {
	none := fixed{name: "none", err: ErrNoCredentials}
	bad := fixed{name: "bad", err: ErrUnauthenticated}
	down := fixed{name: "down", err: ErrUnavailable}
	denied := fixed{name: "denied", err: ErrPermissionDenied}
	okA := fixed{name: "a", id: "spiffe://td/a"}
	okB := fixed{name: "b", id: "spiffe://td/b"}
	tests := []struct {
		name       string
		chain      Chain
		wantID     string
		wantMethod string
		wantErr    error
	}{
		{"first success wins", Chain{okA, okB}, "spiffe://td/a", "a", nil},
		{"failures are skipped", Chain{none, bad, okB}, "spiffe://td/b", "b", nil},
		{"nothing presented", Chain{none, none}, "", "", ErrNoCredentials},
		{"bad beats none", Chain{none, bad}, "", "", ErrUnauthenticated},
		{"unavailable beats bad", Chain{bad, down}, "", "", ErrUnavailable},
		{"denied beats all", Chain{down, denied, bad}, "", "", ErrPermissionDenied},
		{"empty chain", Chain{}, "", "", ErrUnauthenticated},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r, err := tt.chain.AuthenticateResult(context.Background(), Caller{})
			if tt.wantErr != nil {
				if !errors.Is(err, tt.wantErr) {
					t.Fatalf("err = %v, want %v", err, tt.wantErr)
				}
				if tt.wantErr != ErrPermissionDenied && errors.Is(err, ErrPermissionDenied) {
					t.Fatalf("err = %v is also PermissionDenied", err)
				}
				for _, a := range tt.chain {
					if !strings.Contains(err.Error(), a.Name()+":") {
						t.Fatalf("err = %v does not give %s's reason", err, a.Name())
					}
				}
				return
			}
			if err != nil || r.ID.String() != tt.wantID || r.Method != tt.wantMethod {
				t.Fatalf("got %+v, %v", r, err)
			}
		})
	}
}

func TestServiceAccountID(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	tests := []struct {
		user, want string
	}{
		{"system:serviceaccount:demo:client", "spiffe://cluster.local/ns/demo/sa/client"},
		{"system:serviceaccount:istio-system:meshproxy-ca", "spiffe://cluster.local/ns/istio-system/sa/meshproxy-ca"},
		{"system:serviceaccount:demo", ""},
		{"system:serviceaccount::sa", ""},
		{"system:serviceaccount:ns:", ""},
		{"system:serviceaccount:ns:a:b", ""},
		{"system:serviceaccount:ns:UPPER", ""},
		{"system:node:worker-1", ""},
		{"alice", ""},
	}
	for _, tt := range tests {
		id, err := ServiceAccountID(td, tt.user)
		if tt.want == "" {
			if !errors.Is(err, ErrPermissionDenied) {
				t.Errorf("%q: got %v, %v; want PermissionDenied", tt.user, id, err)
			}
			continue
		}
		if err != nil || id.String() != tt.want {
			t.Errorf("%q: got %v, %v; want %s", tt.user, id, err, tt.want)
		}
	}
}
