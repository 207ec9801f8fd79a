// Package proctest looks at processes and streams for tests: whether a
// process is gone, which "sleep ARG" processes live, reading a stream up to
// a marker, waiting (bounded) for a condition. One copy for every
// package's tests.
package proctest

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Children lists pid's children, forked by any of its threads.
func Children(pid int) []int {
	var out []int
	tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/children", pid))
	for _, task := range tasks {
		b, _ := os.ReadFile(task)
		for _, f := range strings.Fields(string(b)) {
			if n, err := strconv.Atoi(f); err == nil {
				out = append(out, n)
			}
		}
	}
	sort.Ints(out)
	return out
}

// Gone reports whether pid has exited (or is a zombie nobody will reap).
func Gone(pid int) bool {
	if err := syscall.Kill(pid, 0); err != nil {
		return true
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	return len(f) > 0 && (f[0] == "Z" || f[0] == "X")
}

// WaitFor polls cond every 5 ms until it holds, and fails the test,
// naming what it waited for, when it does not within the bound.
func WaitFor(t testing.TB, within time.Duration, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(within); !cond(); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", within, what)
		}
	}
}

// WaitGone fails the test when pid still runs 10 s from now.
func WaitGone(t testing.TB, pid int) {
	t.Helper()
	WaitFor(t, 10*time.Second, fmt.Sprintf("process %d to end", pid), func() bool { return Gone(pid) })
}

// Sleepers are the pids of live "sleep ARG" processes: a test's command
// with a unique ARG is found so, wherever it runs.
func Sleepers(arg string) []int {
	var out []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if err == nil && string(b) == "sleep\x00"+arg+"\x00" && !Gone(pid) {
			out = append(out, pid)
		}
	}
	return out
}

// WaitSleepers waits (10 s at most) for n live "sleep ARG" processes and
// returns their pids: a command that prints and then execs its sleep is
// seen by its client before the exec.
func WaitSleepers(t testing.TB, arg string, n int) []int {
	t.Helper()
	var pids []int
	WaitFor(t, 10*time.Second, fmt.Sprintf("%d live 'sleep %s' processes", n, arg), func() bool {
		pids = Sleepers(arg)
		return len(pids) == n
	})
	return pids
}

// ReadUntil reads c until what it read contains s, and returns that; a
// read error first fails the test.
func ReadUntil(t testing.TB, c io.Reader, s string) string {
	t.Helper()
	var got []byte
	buf := make([]byte, 256)
	for !strings.Contains(string(got), s) {
		n, err := c.Read(buf)
		if err != nil {
			t.Fatalf("waiting for %q, read %q: %v", s, got, err)
		}
		got = append(got, buf[:n]...)
	}
	return string(got)
}

// Buffer is a bytes.Buffer safe for one writer and readers at once: a
// process's or stream's output, read while it comes.
type Buffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *Buffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *Buffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
