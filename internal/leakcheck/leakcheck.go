// Package leakcheck fails a test binary whose goroutines outlive its tests.
// It counts goroutines, which is crude but has no dependencies and catches
// the leaks that matter here: a pump or relay goroutine that never ends.
package leakcheck

import (
	"fmt"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"
)

// Main runs the tests, then waits up to 10 s for the goroutine count to
// return to what it was before them; if it does not, it prints the stacks
// of the goroutines that remain and exits 1. Use it as TestMain's body.
func Main(m *testing.M) {
	before := runtime.NumGoroutine()
	code := m.Run()
	if code == 0 {
		if err := Wait(before, 10*time.Second); err != nil {
			fmt.Fprintln(os.Stderr, err)
			code = 1
		}
	}
	os.Exit(code)
}

// Wait polls until at most n goroutines run, or fails after timeout with a
// dump of those still running.
func Wait(n int, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		if runtime.NumGoroutine() <= n {
			return nil
		}
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			buf = buf[:runtime.Stack(buf, true)]
			return fmt.Errorf("leakcheck: %d goroutines still running after the tests, %d before:\n%s",
				runtime.NumGoroutine(), n, strings.TrimSpace(string(buf)))
		}
		time.Sleep(20 * time.Millisecond)
	}
}
