package awspca

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/smithy-go"

	"github.com/meshproxy/meshproxy/ca"
)

// TestGivingUpNamesTheLastAnswer: when the deadline cuts an attempt short,
// the error still names what AWS answered before it (throttling), not the
// cancellation of the attempt that never got an answer — which is what a
// slow machine sees when the deadline falls during a request.
func TestGivingUpNamesTheLastAnswer(t *testing.T) {
	last := &lastError{}
	r := &recordingRetryer{Retryer: aws.NopRetryer{}, last: last}
	throttled := &smithy.GenericAPIError{Code: "ThrottlingException", Message: "Rate exceeded"}
	r.IsErrorRetryable(throttled)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	cut := &smithy.CanceledError{Err: ctx.Err()}
	r.IsErrorRetryable(cut)
	err := last.describe(ctx, cut)
	if !errors.Is(err, ca.ErrBackendUnavailable) || !strings.Contains(err.Error(), "Rate exceeded") {
		t.Fatalf("err = %v, want ErrBackendUnavailable naming the throttling", err)
	}

	// With no answer before it, the cancellation is what there is to say.
	alone := &lastError{}
	(&recordingRetryer{Retryer: aws.NopRetryer{}, last: alone}).IsErrorRetryable(cut)
	if err := alone.describe(ctx, cut); !strings.Contains(err.Error(), "canceled") {
		t.Fatalf("err = %v, want the cancellation", err)
	}
}
