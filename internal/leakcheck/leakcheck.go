// Package leakcheck fails a test binary whose goroutines outlive its tests
// (and keeps the race runtime from sleeping at the exit of the children
// such a binary starts: see Main).
// A leak is a goroutine with a frame of this module's code in its stack
// after every test has returned (a pump, relay or session goroutine that
// never ended); goroutines of the runtime and the testing package are not
// counted, so it neither misses ours nor blames theirs.
package leakcheck

import (
	"fmt"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"
)

const module = "github.com/attach-agent/attach-agent/"

// Main runs the tests, then waits up to 10 s for this module's goroutines
// to end; if some do not, it prints their stacks and exits 1. Use it as
// TestMain's body.
func Main(m *testing.M) {
	// The test binary re-executed (session workers, sandbox inits, a
	// spare's warm-up) must not sleep a second at its exit, as a race-built
	// binary does by default (ThreadSanitizer's atexit_sleep_ms): children
	// read GORACE at their start.
	if os.Getenv("GORACE") == "" {
		_ = os.Setenv("GORACE", "atexit_sleep_ms=0")
	}
	code := m.Run()
	if code == 0 {
		if err := Wait(10 * time.Second); err != nil {
			fmt.Fprintln(os.Stderr, err)
			code = 1
		}
	}
	os.Exit(code)
}

// Wait polls until no goroutine runs this module's code (but the caller),
// or fails after timeout with the stacks of those still running.
func Wait(timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		left := leaked()
		if len(left) == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("leakcheck: %d goroutines outlived the tests:\n\n%s", len(left), strings.Join(left, "\n\n"))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func leaked() []string {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			buf = buf[:n]
			break
		}
		buf = make([]byte, 2*len(buf))
	}
	var out []string
	for _, g := range strings.Split(string(buf), "\n\n") {
		if strings.Contains(g, module) && !strings.Contains(g, module+"internal/leakcheck.") {
			out = append(out, g)
		}
	}
	return out
}
