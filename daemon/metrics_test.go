package daemon_test

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/attach-agent/attach-agent/daemon"
)

// What an operator wires up next, checked against the metrics as built:
// the alerting rules and the dashboard name only metrics the daemon
// exports, the rules pass promtool's checks and their unit tests, and every
// dashboard query is valid PromQL (promtool checks it as a recording rule).
func TestAlertsAndDashboard(t *testing.T) {
	reg := prometheus.NewRegistry()
	daemon.NewMetrics(reg)
	fams, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	known := map[string]bool{"attach_agent_build_info": true} // serve's own
	for _, f := range fams {
		n := f.GetName()
		known[n] = true
		for _, s := range []string{"_bucket", "_sum", "_count"} {
			known[n+s] = true
		}
	}
	alerts, err := os.ReadFile("../packaging/prometheus/alerts.yml")
	if err != nil {
		t.Fatal(err)
	}
	raw, err := os.ReadFile("../packaging/grafana/attach-agent.json")
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		Panels []struct {
			Title   string `json:"title"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
	}
	if err := json.Unmarshal(raw, &dash); err != nil {
		t.Fatalf("dashboard: %v", err)
	}
	var exprs []string
	for _, p := range dash.Panels {
		for _, tg := range p.Targets {
			exprs = append(exprs, tg.Expr)
		}
	}
	if len(exprs) < 8 {
		t.Fatalf("dashboard has %d queries", len(exprs))
	}
	name := regexp.MustCompile(`attach_agent_[a-z_]+`)
	for _, src := range append([]string{string(alerts)}, exprs...) {
		for _, m := range name.FindAllString(src, -1) {
			if !known[m] {
				t.Errorf("%s is not a metric the daemon exports", m)
			}
		}
	}
	for _, want := range []string{`reason="spawn_failed"`, "attach_agent_tls_handshake_duration_seconds_bucket", "attach_agent_attach_to_first_byte_seconds_bucket", "attach_agent_sessions_ended_total"} {
		if !strings.Contains(string(raw), strings.ReplaceAll(want, `"`, `\"`)) {
			t.Errorf("the dashboard shows no %s", want)
		}
	}

	promtool, err := exec.LookPath("promtool")
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("no promtool: .ci/run installs Debian's prometheus package")
		}
		t.Skip("no promtool (apt-get install prometheus)")
	}
	var rules strings.Builder
	rules.WriteString("groups:\n  - name: dashboard\n    rules:\n")
	for i, e := range exprs {
		q, _ := json.Marshal(e) // a JSON string is a YAML double-quoted scalar
		fmt.Fprintf(&rules, "      - record: dashboard:query%d\n        expr: %s\n", i, q)
	}
	f := filepath.Join(t.TempDir(), "dashboard-rules.yml")
	if err := os.WriteFile(f, []byte(rules.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{
		{"check", "rules", "../packaging/prometheus/alerts.yml"},
		{"test", "rules", "../packaging/prometheus/alerts_test.yml"},
		{"check", "rules", f},
	} {
		if out, err := exec.Command(promtool, args...).CombinedOutput(); err != nil {
			t.Errorf("promtool %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
}
