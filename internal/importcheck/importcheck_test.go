package importcheck

import (
	"os/exec"
	"strings"
	"testing"
)

// forbidden are import path prefixes the byte-moving packages must not
// reach, even through a dependency.
var forbidden = map[string][]string{
	"github.com/attach-agent/attach-agent/ptyio":   {"net/http", "github.com/prometheus/", "github.com/coreos/go-systemd/", "github.com/attach-agent/attach-agent/tlsdial", "github.com/attach-agent/attach-agent/container"},
	"github.com/attach-agent/attach-agent/tlsdial": {"net/http", "github.com/prometheus/", "github.com/coreos/go-systemd/", "github.com/attach-agent/attach-agent/ptyio"},
	// One session: no control API, metrics, journal or supervisor (the
	// daemon package's, which builds on it).
	"github.com/attach-agent/attach-agent/agent": {"net/http", "github.com/prometheus/", "github.com/coreos/go-systemd/", "github.com/attach-agent/attach-agent/daemon", "github.com/attach-agent/attach-agent/rendezvous"},
	// What both ends share: bytes only, below every package that dials,
	// relays or runs.
	"github.com/attach-agent/attach-agent/wire": {"net/http", "github.com/prometheus/", "github.com/coreos/go-systemd/", "github.com/attach-agent/attach-agent/tlsdial",
		"github.com/attach-agent/attach-agent/rendezvous", "github.com/attach-agent/attach-agent/ptyio", "github.com/attach-agent/attach-agent/agent"},
}

func TestPackageBoundaries(t *testing.T) {
	goBin, err := exec.LookPath("go")
	if err != nil {
		t.Fatalf("no go on PATH: %v", err)
	}
	for pkg, bad := range forbidden {
		out, err := exec.Command(goBin, "list", "-deps", "-f", "{{.ImportPath}}", pkg).CombinedOutput()
		if err != nil {
			t.Fatalf("go list %s: %v\n%s", pkg, err, out)
		}
		deps := strings.Fields(string(out))
		if len(deps) < 5 {
			t.Fatalf("go list %s gave %d packages: the check would see nothing", pkg, len(deps))
		}
		for _, d := range deps {
			for _, b := range bad {
				if d == b || strings.HasPrefix(d, b) || strings.HasPrefix(d, b+"/") {
					t.Errorf("%s depends on %s: it must know nothing of HTTP, Prometheus, journald or the packages beside it", pkg, d)
				}
			}
		}
	}
}
