package main

import (
	"testing"

	"github.com/meshproxy/meshproxy/proxy"
	"github.com/spf13/pflag"
)

func TestHBONEFlagKeepsTheOldBooleanSpellings(t *testing.T) {
	for _, tt := range []struct {
		args []string
		want proxy.HBONEMode
	}{
		{nil, proxy.HBONEAuto},
		{[]string{"--hbone=auto"}, proxy.HBONEAuto},
		{[]string{"--hbone=always"}, proxy.HBONEAlways},
		{[]string{"--hbone=never"}, proxy.HBONENever},
		{[]string{"--hbone"}, proxy.HBONEAlways}, // the old boolean flag
		{[]string{"--hbone", "--hbone-listen", "off"}, proxy.HBONEAlways},
		{[]string{"--hbone=true"}, proxy.HBONEAlways},
		{[]string{"--hbone=false"}, proxy.HBONENever},
	} {
		f := hboneFlag{mode: proxy.HBONEAuto}
		fs := pflag.NewFlagSet("run", pflag.ContinueOnError)
		fs.Var(&f, "hbone", "")
		fs.Lookup("hbone").NoOptDefVal = string(proxy.HBONEAlways)
		fs.String("hbone-listen", "", "")
		if err := fs.Parse(tt.args); err != nil {
			t.Errorf("%v: %v", tt.args, err)
			continue
		}
		if f.mode != tt.want {
			t.Errorf("%v: mode %s, want %s", tt.args, f.mode, tt.want)
		}
	}
	var f hboneFlag
	if err := f.Set("sometimes"); err == nil {
		t.Error("--hbone=sometimes accepted")
	}
}

func TestHBONEPeerAndKeyExchangeAreValidated(t *testing.T) {
	for name, f := range map[string]runFlags{
		"peer without always":  {hbone: hboneFlag{mode: proxy.HBONEAuto}, hbonePeers: []string{"10.0.0.1:80=10.0.0.1:15008"}, keyExchange: "hybrid-pq"},
		"unknown key exchange": {hbone: hboneFlag{mode: proxy.HBONEAuto}, keyExchange: "rsa"},
		"bad listen":           {hbone: hboneFlag{mode: proxy.HBONEAlways}, hboneListen: "nowhere", keyExchange: "x25519"},
	} {
		if _, err := f.hboneOptions(); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	f := runFlags{hbone: hboneFlag{mode: proxy.HBONEAlways}, hboneListen: ":15008", keyExchange: "x25519",
		hbonePeers: []string{"10.0.0.1:80=10.0.0.1:15008"}}
	if _, err := f.hboneOptions(); err != nil {
		t.Errorf("valid flags refused: %v", err)
	}
}
