package authn

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshproxy/meshproxy/ca/authn/authntest"
)

func TestCachedTokenReviewFloodCostsOneCall(t *testing.T) {
	api := authntest.NewAPIServer(t)
	api.AddToken("good", authntest.ServiceAccount{Namespace: "demo", Name: "client", Audiences: []string{"istio-ca"}})
	kc, err := KubeconfigAPI(api.WriteKubeconfig(t, t.TempDir(), true))
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	now := time.Unix(1_700_000_000, 0)
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	c := NewCached(NewKubernetes(kc, clusterLocal, WithLogger(quietLogger())), 0, 0, WithClock(clock))

	flood := func(token string) (ok, refused int) {
		var okN, refusedN atomic.Int32
		var wg sync.WaitGroup
		for range 300 {
			wg.Go(func() {
				id, err := c.Authenticate(context.Background(), Caller{Token: token})
				switch {
				case err == nil && id.String() == "spiffe://cluster.local/ns/demo/sa/client":
					okN.Add(1)
				case errors.Is(err, ErrUnauthenticated) && !errors.Is(err, ErrUnavailable):
					refusedN.Add(1)
				}
			})
		}
		wg.Wait()
		return int(okN.Load()), int(refusedN.Load())
	}
	if ok, _ := flood("good"); ok != 300 || api.Reviews.Load() != 1 {
		t.Fatalf("300 calls with one valid token: %d accepted, %d TokenReviews; want 300 and 1", ok, api.Reviews.Load())
	}
	if _, refused := flood("forged"); refused != 300 || api.Reviews.Load() != 2 {
		t.Fatalf("300 calls with one forged token: %d refused, %d TokenReviews; want 300 and 2", refused, api.Reviews.Load())
	}
	// Past the TTL the verdict is checked again: a deleted pod's token stops
	// working within DefaultCacheTTL.
	api.DeletePod("good")
	mu.Lock()
	now = now.Add(DefaultCacheTTL + time.Second)
	mu.Unlock()
	if _, err := c.Authenticate(context.Background(), Caller{Token: "good"}); !errors.Is(err, ErrUnauthenticated) || api.Reviews.Load() != 3 {
		t.Fatalf("after the TTL, a deleted pod's token: %v after %d reviews; want refused by a new review", err, api.Reviews.Load())
	}
}

// flaky is an authenticator whose backend is down; it counts calls.
type flaky struct{ calls atomic.Int32 }

func (*flaky) Name() string { return "flaky" }
func (f *flaky) Authenticate(context.Context, Caller) (spiffeid.ID, error) {
	f.calls.Add(1)
	return spiffeid.ID{}, fmt.Errorf("%w: connection refused", ErrUnavailable)
}

func TestCachedNeverKeepsAnUnreachableBackendOrTooManyTokens(t *testing.T) {
	f := &flaky{}
	c := NewCached(f, time.Hour, 8)
	for range 3 {
		if _, err := c.Authenticate(context.Background(), Caller{Token: "t"}); !errors.Is(err, ErrUnavailable) {
			t.Fatalf("err = %v, want ErrUnavailable", err)
		}
	}
	if f.calls.Load() != 3 {
		t.Fatalf("an unavailable backend was asked %d times for 3 calls: its answer was cached", f.calls.Load())
	}

	api := authntest.NewAPIServer(t)
	kc, err := KubeconfigAPI(api.WriteKubeconfig(t, t.TempDir(), true))
	if err != nil {
		t.Fatal(err)
	}
	k := NewCached(NewKubernetes(kc, clusterLocal, WithLogger(quietLogger())), time.Hour, 8)
	for i := range 100 {
		_, _ = k.Authenticate(context.Background(), Caller{Token: fmt.Sprintf("forged-%d", i)})
		if n := k.Len(); n > 8 {
			t.Fatalf("cache holds %d tokens, bound 8", n)
		}
	}
}
