package agent_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/attach-agent/attach-agent/agent"
	"github.com/attach-agent/attach-agent/internal/netnstest"
	"github.com/attach-agent/attach-agent/internal/proctest"
	"github.com/attach-agent/attach-agent/ptyio"
	"github.com/attach-agent/attach-agent/rendezvous"
	"github.com/attach-agent/attach-agent/tlsdial"
	"github.com/attach-agent/attach-agent/wire"
)

// Invariant 1: no byte lost, none reordered, in pipes mode and raw pty.
func TestEightMiBEachWayThroughCat(t *testing.T) {
	h := newHarness(t, nil)
	for _, mode := range []string{"pipes", "raw-pty"} {
		t.Run(mode, func(t *testing.T) {
			p := ptyio.Spec{Argv: []string{"cat"}, TTY: mode == "raw-pty", Raw: mode == "raw-pty"}
			u, res := h.session(t, agent.Spec{Process: p})
			c := h.client(t, u)
			data := randomBytes(8 << 20)
			got, err := echo(c, data)
			if err != nil {
				t.Fatal(err)
			}
			if len(got) != len(data) || sum(got) != sum(data) {
				t.Fatalf("got %d bytes back (sha256 %s), sent %d (%s)", len(got), sum(got)[:12], len(data), sum(data)[:12])
			}
			r := wait(t, res, 30*time.Second)
			if r.Reason != ptyio.ReasonExited || r.ExitCode != 0 || r.BytesIn != int64(len(data)) || r.BytesOut != int64(len(data)) {
				t.Fatalf("result %v, want exited 0 with %d bytes each way", r, len(data))
			}
		})
	}
}

// Invariant 1 at exit: output written just before exit all arrives, then
// the marker, then the close.
func TestBigOutputThenExit(t *testing.T) {
	h := newHarness(t, nil)
	data := randomBytes(32 << 20)
	file := filepath.Join(t.TempDir(), "out")
	if err := os.WriteFile(file, data, 0o600); err != nil {
		t.Fatal(err)
	}
	u, res := h.session(t, agent.Spec{Process: ptyio.Spec{Argv: sh("cat " + file + "; exit 3")}, ExitStatusMarker: true})
	c := h.client(t, u)
	_ = c.CloseWrite()
	got, err := io.ReadAll(c)
	if err != nil {
		t.Fatal(err)
	}
	marker := wire.ExitStatusLine(3)
	if !bytes.HasSuffix(got, []byte(marker)) {
		t.Fatalf("stream does not end with the marker: last bytes %q", got[max(0, len(got)-40):])
	}
	if out := got[:len(got)-len(marker)]; len(out) != len(data) || sum(out) != sum(data) {
		t.Fatalf("got %d bytes before the marker, want %d, sha256 equal %v", len(out), len(data), sum(out) == sum(data))
	}
	if r := wait(t, res, 30*time.Second); r.Reason != ptyio.ReasonExited || r.ExitCode != 3 {
		t.Fatalf("result %v", r)
	}
}

func TestHundredShortExitRaces(t *testing.T) {
	h := newHarness(t, nil)
	for i := range 100 {
		want := fmt.Sprintf("run %d: the last line before exit", i)
		u, res := h.session(t, agent.Spec{Process: ptyio.Spec{Argv: sh("printf '" + want + "\\n'; exit 3"), TTY: true}, ExitStatusMarker: true})
		c := h.client(t, u)
		got, err := io.ReadAll(c)
		if err != nil {
			t.Fatalf("run %d: %v", i, err)
		}
		_ = c.Close() // as a real client does at the end of the stream
		out, status, found := stripMarker(got)
		if !found || status != 3 || string(out) != want+"\r\n" {
			t.Fatalf("run %d: output %q status %d found %v", i, out, status, found)
		}
		if r := wait(t, res, 30*time.Second); r.Reason != ptyio.ReasonExited || r.ExitCode != 3 {
			t.Fatalf("run %d: result %v", i, r)
		}
	}
}

// The Rendezvous stall: a load balancer sending 16 KiB TLS records must not
// leave bytes stranded in the TLS buffer.
func TestCoalescedRecordsDoNotStall(t *testing.T) {
	h := newHarness(t, &rendezvous.Relay{Coalesce: true})
	const idle = 20 * time.Second
	u, res := h.session(t, agent.Spec{
		Process: ptyio.Spec{Argv: []string{"cat"}, TTY: true, Raw: true},
		Pump:    ptyio.Config{IdleTimeout: idle},
	})
	c := h.client(t, u)
	data := randomBytes(64 << 10)
	t0 := time.Now()
	if _, err := c.Write(data); err != nil {
		t.Fatal(err)
	}
	// The echo must come back long before the idle timeout could unstick it.
	_ = c.SetReadDeadline(time.Now().Add(idle / 2))
	got := make([]byte, len(data))
	if _, err := io.ReadFull(c, got); err != nil {
		t.Fatalf("echo of a 64 KiB burst through 16 KiB records: %v after %v", err, time.Since(t0))
	}
	if sum(got) != sum(data) {
		t.Fatal("echo differs")
	}
	t.Logf("64 KiB echoed through 16 KiB records in %v", time.Since(t0))
	_ = c.CloseWrite()
	if r := wait(t, res, 30*time.Second); r.Reason != ptyio.ReasonExited {
		t.Fatalf("result %v", r)
	}
}

// The close_notify spin: data and close at once must give the process all
// of it, then EOF, and the agent must not burn CPU afterwards.
func TestDataThenCloseNoSpin(t *testing.T) {
	h := newHarness(t, nil)
	ready := filepath.Join(t.TempDir(), "counted")
	u, res := h.session(t, agent.Spec{
		Process: ptyio.Spec{Argv: sh("wc -c > " + ready + ".tmp; mv " + ready + ".tmp " + ready + "; sleep 1")},
		Pump:    ptyio.Config{EOFByte: false},
	})
	c := h.client(t, u)
	if _, err := c.Write(randomBytes(1 << 20)); err != nil {
		t.Fatal(err)
	}
	if err := c.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(20 * time.Second)
	var count []byte
	for {
		b, err := os.ReadFile(ready)
		if err == nil {
			count = b
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the process never got EOF")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if strings.TrimSpace(string(count)) != "1048576" {
		t.Fatalf("process counted %q bytes, want 1048576", count)
	}
	// The process sleeps a second with its input closed: the agent waits.
	before := cpuTime()
	r := wait(t, res, 30*time.Second)
	used := cpuTime() - before
	if r.Reason != ptyio.ReasonExited {
		t.Fatalf("result %v", r)
	}
	// A spinning reader burns the whole second; an idle one next to nothing.
	if used > 300*time.Millisecond {
		t.Fatalf("test process used %v of CPU while the session waited ~1s with input closed", used)
	}
	if r.Empty > 0 {
		t.Errorf("%d reads without progress", r.Empty)
	}
}

func cpuTime() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// A slow download is not idleness; a silent session is.
func TestIdleTimeout(t *testing.T) {
	h := newHarness(t, nil)
	t.Run("slow download completes", func(t *testing.T) {
		const idle = 500 * time.Millisecond
		const size = 256 << 10
		small := func(_, _ string, c syscall.RawConn) error {
			var serr error
			_ = c.Control(func(fd uintptr) { serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_SNDBUF, 8<<10) })
			return serr
		}
		dial := h.dial
		dial.Control = small
		u, res := h.session(t, agent.Spec{
			Dial:    dial,
			Process: ptyio.Spec{Argv: sh(fmt.Sprintf("head -c %d /dev/zero", size))},
			Pump:    ptyio.Config{IdleTimeout: idle},
		})
		cdial := h.dial
		cdial.Control = func(_, _ string, c syscall.RawConn) error {
			var serr error
			_ = c.Control(func(fd uintptr) { serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 8<<10) })
			return serr
		}
		c, err := tlsdial.Dial(context.Background(), u, cdial)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if err := c.Pair(context.Background(), u.Secret, 30*time.Second); err != nil {
			t.Fatal(err)
		}
		// Read at 64 KiB/s: 4 KiB every 62.5 ms.
		t0 := time.Now()
		var got int
		buf := make([]byte, 4<<10)
		tick := time.NewTicker(62500 * time.Microsecond)
		defer tick.Stop()
		_ = c.SetReadDeadline(time.Now().Add(60 * time.Second))
		for {
			<-tick.C
			n, err := io.ReadFull(c, buf)
			got += n
			if err != nil {
				break
			}
		}
		took := time.Since(t0)
		r := wait(t, res, 30*time.Second)
		if got != size || r.Reason != ptyio.ReasonExited {
			t.Fatalf("got %d of %d bytes in %v, result %v", got, size, took, r)
		}
		if took < 3*idle {
			t.Fatalf("download took %v, not the 3x idle timeout (%v) this test is about", took, 3*idle)
		}
		t.Logf("%d KiB at ~64 KiB/s in %v with a %v idle timeout", size>>10, took, idle)
	})
	t.Run("silent session ends", func(t *testing.T) {
		pidFile := filepath.Join(t.TempDir(), "pid")
		u, res := h.session(t, agent.Spec{
			Process: ptyio.Spec{Argv: sh("echo $$ > " + pidFile + "; exec sleep 1000"), TTY: true},
			Pump:    ptyio.Config{IdleTimeout: 300 * time.Millisecond},
		})
		c := h.client(t, u)
		got, _ := io.ReadAll(c)
		r := wait(t, res, 30*time.Second)
		if r.Reason != ptyio.ReasonIdle {
			t.Fatalf("result %v, want idle_timeout", r)
		}
		if !strings.Contains(string(got), "attach-agent: session ended: idle for 300ms") {
			t.Errorf("client got %q, want the idle notice", got)
		}
		proctest.WaitGone(t, readPid(t, pidFile))
	})
}

func readPid(t *testing.T, file string) int {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		t.Fatal(err)
	}
	return pid
}

// The client vanishes with a reset: SIGHUP reaches the process; one that
// ignores HUP and TERM is killed after the grace.
func TestClientVanishes(t *testing.T) {
	h := newHarness(t, nil)
	for _, tc := range []struct {
		name   string
		script string
		sig    syscall.Signal
	}{
		{"plain", "echo ready; exec sleep 1000", syscall.SIGHUP},
		{"ignores HUP and TERM", "trap '' HUP TERM; echo ready; sleep 1000; echo survived", syscall.SIGKILL},
	} {
		t.Run(tc.name, func(t *testing.T) {
			u, res := h.session(t, agent.Spec{
				Process: ptyio.Spec{Argv: sh(tc.script)},
				Pump:    ptyio.Config{TermDelay: 100 * time.Millisecond, KillGrace: 300 * time.Millisecond},
			})
			c := h.client(t, u)
			buf := make([]byte, 6)
			if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "ready\n" {
				t.Fatalf("read %q, %v", buf, err)
			}
			// Vanish: a reset with no close_notify before it (tls.Conn.Close
			// would send one).
			_ = c.Raw.(*net.TCPConn).SetLinger(0)
			_ = c.Raw.Close()
			r := wait(t, res, 30*time.Second)
			if r.Reason != ptyio.ReasonClientGone || r.Signal != tc.sig {
				t.Fatalf("result %v signal %v, want client_gone by %v", r, r.Signal, tc.sig)
			}
		})
	}
}

// A background child holding the pty does not hold the session.
func TestBackgroundChildDoesNotHoldSession(t *testing.T) {
	h := newHarness(t, nil)
	u, res := h.session(t, agent.Spec{Process: ptyio.Spec{Argv: sh("sleep 1000 & echo $!; echo done"), TTY: true}})
	c := h.client(t, u)
	got, err := io.ReadAll(c)
	if err != nil {
		t.Fatal(err)
	}
	r := wait(t, res, 20*time.Second)
	lines := strings.Fields(string(got))
	if len(lines) != 2 || lines[1] != "done" || r.Reason != ptyio.ReasonExited {
		t.Fatalf("got %q, result %v", got, r)
	}
	if r.Timings.Total > 10*time.Second {
		t.Errorf("session took %v with a background child", r.Timings.Total)
	}
	pid, err := strconv.Atoi(lines[0])
	if err != nil {
		t.Fatal(err)
	}
	proctest.WaitGone(t, pid)
}

func TestWindowSizeAndEnvironment(t *testing.T) {
	h := newHarness(t, nil)
	t.Setenv("ATTACH_AGENT_OWN_SECRET", "must-not-leak")
	u, res := h.session(t, agent.Spec{Process: ptyio.Spec{
		Argv: sh("stty size; env"), TTY: true, Cols: 132, Rows: 43, Env: []string{"FOO=bar", "COLUMNS=132", "LINES=43"},
	}})
	c := h.client(t, u)
	got, err := io.ReadAll(c)
	if err != nil {
		t.Fatal(err)
	}
	wait(t, res, 20*time.Second)
	out := string(got)
	if !strings.HasPrefix(out, "43 132\r\n") {
		t.Errorf("stty size printed %q, want 43 132", strings.SplitN(out, "\n", 2)[0])
	}
	if !strings.Contains(out, "FOO=bar") || !strings.Contains(out, "TERM=xterm-256color") || !strings.Contains(out, "PATH=") {
		t.Errorf("env lacks the given variables or the defaults:\n%s", out)
	}
	if strings.Contains(out, "ATTACH_AGENT_OWN_SECRET") || strings.Contains(out, "must-not-leak") {
		t.Errorf("the agent's own environment leaked into the child:\n%s", out)
	}
}

func TestNothingRunsWithoutAClient(t *testing.T) {
	h := newHarness(t, nil)
	touched := filepath.Join(t.TempDir(), "ran")
	dial := h.dial
	dial.PairTimeout = 300 * time.Millisecond
	_, res := h.session(t, agent.Spec{Dial: dial, Process: ptyio.Spec{Argv: []string{"touch", touched}}})
	r := wait(t, res, 20*time.Second)
	if r.Reason != agent.ReasonPairTimeout || r.ExitCode != agent.ExitAgentError || r.Started {
		t.Fatalf("result %v, want pair_timeout / 125 / not started", r)
	}
	if _, err := os.Stat(touched); err == nil {
		t.Fatal("the command ran although nobody attached")
	}
}

// openTerminals counts this process's fds on a pty (ptmx or a pts).
func openTerminals(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, e := range ents {
		if l, err := os.Readlink("/proc/self/fd/" + e.Name()); err == nil && (l == "/dev/ptmx" || strings.HasPrefix(l, "/dev/pts/")) {
			n++
		}
	}
	return n
}

// The terminal is opened while the dial is on the wire; a session that
// never starts its command must close it: nobody pairs, the relay is
// down, the command is not found.
func TestSessionsThatNeverStartCloseTheirTerminal(t *testing.T) {
	h := newHarness(t, nil)
	before := openTerminals(t)
	tty := ptyio.Spec{Argv: []string{"true"}, TTY: true, Raw: true}

	dial := h.dial
	dial.PairTimeout = 200 * time.Millisecond
	_, res := h.session(t, agent.Spec{Dial: dial, Process: tty})
	if r := wait(t, res, 20*time.Second); r.Reason != agent.ReasonPairTimeout {
		t.Fatalf("nobody pairs: %v", r)
	}
	if n := openTerminals(t); n != before {
		t.Fatalf("after pair_timeout: %d pty fds open, want %d", n, before)
	}

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	down := tlsdial.URL{Host: "127.0.0.1", Port: ln.Addr().(*net.TCPAddr).Port, Secret: "s"}
	_ = ln.Close() // nothing listens there now
	dial = h.dial
	dial.DialTimeout = 300 * time.Millisecond
	_, res = h.session(t, agent.Spec{URL: down, Dial: dial, Process: tty})
	if r := wait(t, res, 20*time.Second); r.Reason != agent.ReasonDialFailed {
		t.Fatalf("relay down: %v", r)
	}
	if n := openTerminals(t); n != before {
		t.Fatalf("after dial_failed: %d pty fds open, want %d", n, before)
	}

	u, res := h.session(t, agent.Spec{Process: ptyio.Spec{Argv: []string{"no-such-command-xyz"}, TTY: true}})
	c := h.client(t, u)
	_, _ = io.ReadAll(c)
	if r := wait(t, res, 20*time.Second); r.Reason != agent.ReasonSpawnFailed {
		t.Fatalf("command not found: %v", r)
	}
	if n := openTerminals(t); n != before {
		t.Fatalf("after spawn_failed: %d pty fds open, want %d", n, before)
	}
}

func TestSpawnFailuresReachTheClient(t *testing.T) {
	h := newHarness(t, nil)
	dir := t.TempDir()
	notExec := filepath.Join(dir, "script")
	if err := os.WriteFile(notExec, []byte("#!/bin/sh\necho hi\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		argv []string
		code int
		line string
	}{
		{[]string{"no-such-command-xyz"}, 127, "attach-agent: no-such-command-xyz: command not found"},
		{[]string{notExec}, 126, "attach-agent: " + notExec + ": not executable"},
	} {
		u, res := h.session(t, agent.Spec{Process: ptyio.Spec{Argv: tc.argv, TTY: true}, ExitStatusMarker: true})
		c := h.client(t, u)
		got, err := io.ReadAll(c)
		if err != nil {
			t.Fatal(err)
		}
		out, status, found := stripMarker(got)
		if !strings.HasPrefix(string(out), tc.line) || !found || status != tc.code {
			t.Errorf("%v: client got %q status %d (found %v), want %q and %d", tc.argv, out, status, found, tc.line, tc.code)
		}
		if r := wait(t, res, 20*time.Second); r.Reason != agent.ReasonSpawnFailed || r.ExitCode != tc.code {
			t.Errorf("%v: result %v", tc.argv, r)
		}
	}
}

func TestTwoHundredConcurrentSessions(t *testing.T) {
	h := newHarness(t, nil)
	const n = 200
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		u, res := h.session(t, agent.Spec{Process: ptyio.Spec{Argv: []string{"cat"}}, ExitStatusMarker: true})
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs <- func() error {
				c, err := tlsdial.Dial(context.Background(), u, h.dial)
				if err != nil {
					return err
				}
				defer c.Close()
				if err := c.Pair(context.Background(), u.Secret, 60*time.Second); err != nil {
					return err
				}
				_ = c.SetDeadline(time.Now().Add(120 * time.Second))
				data := randomBytes(64<<10 + i)
				got, err := echo(c, data)
				if err != nil {
					return fmt.Errorf("session %d: %w", i, err)
				}
				out, status, found := stripMarker(got)
				if sum(out) != sum(data) || !found || status != 0 {
					return fmt.Errorf("session %d: %d bytes back of %d, status %d found %v", i, len(out), len(data), status, found)
				}
				select {
				case r := <-res:
					if r.Reason != ptyio.ReasonExited {
						return fmt.Errorf("session %d: %v", i, r)
					}
				case <-time.After(60 * time.Second):
					return fmt.Errorf("session %d did not end", i)
				}
				return nil
			}()
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
}

// Invariant 1 over a slow link: what the command wrote before it exited
// all reaches a client that reads slowly, however long past the drain
// timeout that takes, then the marker. (Through 16 KiB TCP buffers a client
// reading 16 KiB/s once got 335,874 of 400,000 bytes and the marker.)
func TestSlowClientGetsTheTail(t *testing.T) {
	if !netnstest.SmallBuffers(t, 16<<10) {
		return
	}
	h := newHarness(t, nil)
	data := randomBytes(256 << 10)
	file := filepath.Join(t.TempDir(), "out")
	if err := os.WriteFile(file, data, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		tty  bool
	}{{"pipes", false}, {"raw pty", true}} {
		t.Run(tc.name, func(t *testing.T) {
			u, res := h.session(t, agent.Spec{
				Process:          ptyio.Spec{Argv: sh("cat " + file + "; exit 3"), TTY: tc.tty, Raw: tc.tty},
				Pump:             ptyio.Config{DrainTimeout: 200 * time.Millisecond},
				ExitStatusMarker: true,
			})
			c := h.client(t, u)
			// 64 KiB/s: four seconds for what the buffers cannot hold,
			// twenty times the drain timeout.
			var got []byte
			buf := make([]byte, 4<<10)
			for {
				n, err := c.Read(buf)
				got = append(got, buf[:n]...)
				if err != nil {
					break
				}
				time.Sleep(time.Second / 16) // the slow reader, not a synchronisation
			}
			_ = c.Close()
			out, status, found := stripMarker(got)
			if !found || status != 3 || len(out) != len(data) || sum(out) != sum(data) {
				t.Fatalf("got %d of %d bytes (equal %v), status %d found %v", len(out), len(data), sum(out) == sum(data), status, found)
			}
			if r := wait(t, res, 60*time.Second); r.Reason != ptyio.ReasonExited || r.ExitCode != 3 {
				t.Fatalf("result %v", r)
			}
		})
	}
}

// The drain timeout still bounds output that appears after the exit: a
// background child writing forever does not hold the session, whether it
// trickles or floods, in pipes or in a pty (where the exit counts more as
// owed than TIOCINQ shows; the leader's exit sends the foreground group
// SIGHUP, which the child ignores, as a hostile one would).
func TestDrainTimeoutBoundsOutputAfterExit(t *testing.T) {
	h := newHarness(t, nil)
	const (
		// Ignored before the fork, so the child has it from its start.
		trickle = `trap '' HUP; (while :; do echo bg; sleep 0.02; done) & echo done; exit 0`
		flood   = `trap '' HUP; (while :; do echo bgbgbgbgbgbgbgbgbgbgbgbgbgbgbgbgbgbgbgbgbgbgbgbgbgbgbgbgbgbgbgbg; done) & echo done; exit 0`
	)
	for _, tc := range []struct {
		name   string
		script string
		tty    bool
	}{{"pipes trickle", trickle, false}, {"pipes flood", flood, false}, {"pty trickle", trickle, true}, {"pty flood", flood, true}} {
		t.Run(tc.name, func(t *testing.T) {
			u, res := h.session(t, agent.Spec{
				Process: ptyio.Spec{Argv: sh(tc.script), TTY: tc.tty},
				Pump:    ptyio.Config{DrainTimeout: 300 * time.Millisecond, KillGrace: 300 * time.Millisecond},
			})
			c := h.client(t, u)
			got, _ := io.ReadAll(c)
			_ = c.Close()
			r := wait(t, res, 30*time.Second)
			// The child's output after the exit came, so the drain is what
			// ended the session, not a hang-up of the pty.
			if r.Reason != ptyio.ReasonExited || !strings.Contains(string(got), "done") || !strings.Contains(string(got), "bg") {
				t.Fatalf("result %v, output %q", r, got[:min(len(got), 200)])
			}
			if r.Timings.Total > 10*time.Second {
				t.Errorf("a background writer held the session for %v (drain timeout 300ms)", r.Timings.Total)
			}
		})
	}
}

// On the Heroku wire a client's close is its Ctrl-C: the session ends as
// client_gone through the hang-up path, the command's last output still
// reaches the client; a binary session's half-close stays end of input.
func TestClientCloseIsAHangUp(t *testing.T) {
	h := newHarness(t, nil)
	for _, tc := range []struct {
		name string
		proc ptyio.Spec
		pump ptyio.Config
	}{
		{"pty", ptyio.Spec{Argv: sh(`trap 'echo hung up; exit 1' HUP; echo started; sleep 30 & wait`), TTY: true}, ptyio.Config{}},
		{"pipes", ptyio.Spec{Argv: sh(`trap 'echo hung up; exit 1' HUP; echo started; sleep 30 & wait`)}, ptyio.Config{EOFByte: true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.pump.KillGrace = 2 * time.Second
			u, res := h.session(t, agent.Spec{Process: tc.proc, Pump: tc.pump})
			c := h.client(t, u)
			if got := proctest.ReadUntil(t, c, "started"); !strings.Contains(got, "started") {
				t.Fatalf("read %q", got)
			}
			// What the Heroku CLI does on Ctrl-C: close_notify and FIN.
			if err := c.CloseWrite(); err != nil {
				t.Fatal(err)
			}
			rest, _ := io.ReadAll(c)
			_ = c.Close()
			r := wait(t, res, 20*time.Second)
			if r.Reason != ptyio.ReasonClientGone || r.ExitCode != 1 {
				t.Fatalf("result %v: want client_gone, the command's trap's exit 1", r)
			}
			if !strings.Contains(string(rest), "hung up") {
				t.Errorf("the output after the hang-up did not reach the client: %q", rest)
			}
			if r.Timings.Total > 15*time.Second {
				t.Errorf("the session ran %v after the client's close (sleep 30)", r.Timings.Total)
			}
		})
	}
	// Binary pipes: the half-close is the end of input, cat ends, exit 0.
	u, res := h.session(t, agent.Spec{Process: ptyio.Spec{Argv: []string{"cat"}}})
	c := h.client(t, u)
	got, err := echo(c, []byte("all of it\x04\xff"))
	if err != nil || string(got) != "all of it\x04\xff" {
		t.Fatalf("echo %q, %v", got, err)
	}
	if r := wait(t, res, 20*time.Second); r.Reason != ptyio.ReasonExited || r.ExitCode != 0 {
		t.Fatalf("binary session: %v", r)
	}
}
