package redirect

import (
	"strings"
	"testing"
)

// iptables before 1.8.10 prints CONNMARK's default masks, later versions
// leave them out: both must compare equal to what install wants, or every
// install would reload the rules (and reset their counters).
func TestIptablesCompareIgnoresDefaultConnmarkMasks(t *testing.T) {
	cfg := Config{Mode: ModeIptables, TProxy: true}.withDefaults()
	want := desiredIptables(cfg, 4)
	for _, withMasks := range []bool{false, true} {
		var save strings.Builder
		for _, tb := range want {
			save.WriteString("*" + tb.name + "\n")
			for _, c := range tb.chains {
				save.WriteString(":" + c + " - [0:0]\n")
			}
			for chain, specs := range tb.rules {
				for _, s := range specs {
					if withMasks && strings.Contains(s, "-j CONNMARK") {
						s += iptDefaultMasks
					}
					save.WriteString("-A " + chain + " " + s + "\n")
				}
			}
			save.WriteString("COMMIT\n")
		}
		if !strings.Contains(save.String(), "CONNMARK --restore-mark") {
			t.Fatalf("TPROXY rules lack the connmark restore:\n%s", save.String())
		}
		if !sameIptables(parseIptablesSave(save.String()), want) {
			t.Errorf("save output (default masks printed: %v) differs from desired:\n%s", withMasks, save.String())
		}
	}
}
