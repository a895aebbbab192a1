package main

import (
	"io"
	"testing"
)

func TestFlatnessToleratesNoiseAndCatchesGrowth(t *testing.T) {
	tests := []struct {
		name  string
		vals  []float64
		floor float64
		flat  bool
	}{
		{"steady with noise", []float64{40, 43, 39, 41, 44, 40, 42, 39, 43}, 8, true},
		{"a step within the allowance", []float64{100, 100, 100, 105, 106, 108, 109, 108, 109}, 8, true},
		{"steady growth", []float64{40, 45, 50, 55, 60, 65, 70, 75, 80}, 8, false},
		{"goroutines leaking one per sample", []float64{50, 60, 70, 80, 90, 100, 110, 120, 130}, 20, false},
		{"shrinking is flat", []float64{90, 80, 70, 60, 50, 40, 30, 20, 10}, 8, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			first, last, allow, flat := flatness(tt.vals, tt.floor)
			if flat != tt.flat {
				t.Fatalf("flatness = %v (first %.1f, last %.1f, allowance %.1f), want %v", flat, first, last, allow, tt.flat)
			}
		})
	}
}

func TestVerdictFailsOnRequestFailures(t *testing.T) {
	var samples []sample
	for i := range 8 {
		samples = append(samples, sample{sides: []usage{{rssKiB: 20 << 10, goroutines: 40, fds: 30}, {rssKiB: 20 << 10, goroutines: 40, fds: 30}}, newConns: int64(i)})
	}
	if !verdict(io.Discard, samples, &stats{}, 2) {
		t.Fatal("flat run without failures judged FAIL")
	}
	st := &stats{}
	st.failures.Add(1)
	if verdict(io.Discard, samples, st, 2) {
		t.Fatal("run with a failed request judged PASS")
	}
}
