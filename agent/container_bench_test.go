package agent_test

import (
	"testing"
	"time"

	"github.com/attach-agent/attach-agent/agent"
	"github.com/attach-agent/attach-agent/container"
	"github.com/attach-agent/attach-agent/ptyio"
)

// BenchmarkSpawn compares the cost of starting a session's command on the
// host, as another user, joined to a running container and in a new
// sandbox: whole sessions of a no-op through the loopback relay, with the
// spawn phase (Apply + Start, the part that differs) reported as
// spawn-us/op. Run as root: go test -run '^$' -bench Spawn ./agent
func BenchmarkSpawn(b *testing.B) {
	needRoot(b)
	root := buildRootfs(b)
	h := newHarness(b, nil)
	for _, bc := range []struct {
		name string
		user string
		ctr  func(b *testing.B) container.Spec
	}{
		{"host", "", func(*testing.B) container.Spec { return container.Spec{} }},
		{"user", "nobody", func(*testing.B) container.Spec { return container.Spec{} }},
		{"join", "", func(b *testing.B) container.Spec { return container.Spec{PID: startContainer(b, "bench", false)} }},
		{"sandbox", "", func(*testing.B) container.Spec { return container.Spec{Rootfs: root} }},
	} {
		b.Run(bc.name, func(b *testing.B) {
			spec := agent.Spec{User: bc.user, Container: bc.ctr(b), Process: ptyio.Spec{Argv: []string{"/bin/sh", "-c", ":"}, TTY: true}}
			var spawn time.Duration
			for b.Loop() {
				_, r := runSession(b, h, spec)
				if r.Reason != ptyio.ReasonExited || r.ExitCode != 0 {
					b.Fatalf("result %v", r)
				}
				spawn += r.Timings.Spawn
			}
			b.ReportMetric(float64(spawn.Microseconds())/float64(b.N), "spawn-us/op")
		})
	}
}
