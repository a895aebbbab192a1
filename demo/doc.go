// Package demo runs meshproxy's narrated loopback demo: a CA, two sidecars
// and an echo app, each sidecar a real `meshproxy run` process that fetches
// its certificate from a real `meshproxy ca serve` process. It prints the
// commands it runs and what each step shows, so a newcomer can follow and
// repeat them by hand.
package demo
