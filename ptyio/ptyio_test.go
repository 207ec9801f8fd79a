package ptyio

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/attach-agent/attach-agent/internal/leakcheck"
	"github.com/attach-agent/attach-agent/internal/relaytest"
	"github.com/creack/pty"
	"golang.org/x/sys/unix"
	"golang.org/x/term"
)

func TestMain(m *testing.M) { leakcheck.Main(m) }

// EIO from the master once the child is gone is the end of output.
func TestMasterEIOIsEOF(t *testing.T) {
	p, err := Start(Spec{Argv: []string{"echo", "hi"}, TTY: true})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	<-p.Done()
	buf := make([]byte, 64)
	var got []byte
	_ = p.master.SetReadDeadline(time.Now().Add(10 * time.Second)) // watchdog
	rc, err := p.master.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	r := &outputReader{rc: rc, gather: gatherWait}
	for {
		n, err := r.read(buf)
		got = append(got, buf[:n]...)
		if err != nil {
			if !errors.Is(err, io.EOF) {
				t.Fatalf("read after exit: %v, want io.EOF (EIO mapped)", err)
			}
			break
		}
	}
	if string(got) != "hi\r\n" {
		t.Fatalf("got %q", got)
	}
}

func TestPumpPipesOverTCP(t *testing.T) {
	client, agentSide := relaytest.TCPPair(t)
	p, err := Start(Spec{Argv: []string{"cat"}})
	if err != nil {
		t.Fatal(err)
	}
	res := make(chan Result, 1)
	go func() { res <- Run(context.Background(), agentSide, p, Config{}) }()
	data := make([]byte, 1<<20)
	_, _ = rand.Read(data)
	go func() {
		_, _ = client.Write(data)
		_ = client.CloseWrite()
	}()
	got, err := io.ReadAll(client)
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("echo: %d bytes, equal %v, err %v", len(got), bytes.Equal(got, data), err)
	}
	_ = client.Close()
	r := <-res
	if r.Reason != ReasonExited || r.BytesIn != int64(len(data)) || r.BytesOut != int64(len(data)) {
		t.Fatalf("result %+v", r)
	}
}

// TestTeardownOrder pins steps 2 and 3 of Run's teardown: the process's
// last output, then the notice, then the exit marker, then the end of the
// stream; and the process is gone before Run returns.
func TestTeardownOrder(t *testing.T) {
	client, agentSide := relaytest.TCPPair(t)
	p, err := Start(Spec{Argv: []string{"sh", "-c", "trap 'echo last words; exit 4' HUP; echo first; read x"}})
	if err != nil {
		t.Fatal(err)
	}
	res := make(chan Result, 1)
	go func() {
		res <- Run(context.Background(), agentSide, p, Config{
			IdleTimeout: 300 * time.Millisecond,
			ExitMarker:  func(code int) string { return "<exit " + string(rune('0'+code)) + ">\n" },
		})
	}()
	got, err := io.ReadAll(client)
	if err != nil {
		t.Fatal(err)
	}
	_ = client.Close()
	r := <-res
	want := "first\nlast words\n\r\nattach-agent: session ended: idle for 300ms\r\n<exit 4>\n"
	if string(got) != want {
		t.Fatalf("stream:\n%q\nwant\n%q", got, want)
	}
	if r.Reason != ReasonIdle || r.ExitCode != 4 {
		t.Fatalf("result %+v", r)
	}
	if p.GroupAlive() {
		t.Fatal("process group still alive after Run returned")
	}
}

func TestStartErrors(t *testing.T) {
	for _, tc := range []struct {
		argv []string
		dir  string
		code int
		msg  string
	}{
		{[]string{"definitely-not-a-command"}, "", 127, "command not found"},
		{[]string{"/etc/passwd"}, "", 126, "not executable"},
		{[]string{"/"}, "", 126, "is a directory"},
		{nil, "", 127, "empty command"},
		// Not "true: command not found", which is what exec's ENOENT for a
		// missing directory would say.
		{[]string{"true"}, "/nonexistent-dir", 125, "start true: working directory: stat /nonexistent-dir: no such file"},
		{[]string{"true"}, "/etc/passwd", 125, "working directory /etc/passwd: not a directory"},
	} {
		_, err := Start(Spec{Argv: tc.argv, Dir: tc.dir, Env: []string{"PATH=/usr/bin:/bin"}})
		var se *SpawnError
		if !errors.As(err, &se) || se.Code != tc.code || !strings.Contains(err.Error()+se.Err.Error(), tc.msg) {
			t.Errorf("Start(%q) = %v, want code %d and %q", tc.argv, err, tc.code, tc.msg)
		}
	}
}

// The whole teardown, recorded step by step: all output (drained), the
// notice for a reason other than exited, the marker, close_notify, the
// linger for the client's end, the close, and the process group reaped,
// in that order and each once.
func TestTeardownOrderRecorded(t *testing.T) {
	for _, tc := range []struct {
		name   string
		script string
		cfg    Config
		want   []string
		stream string
	}{
		{"exited", "echo out; exit 3", Config{},
			[]string{"drained", "marker", "close_notify", "linger", "closed", "reaped"}, "out\n<exit 3>\n"},
		{"idle", "trap 'echo bye; exit 4' HUP; echo out; read x", Config{IdleTimeout: 200 * time.Millisecond},
			[]string{"drained", "notice", "marker", "close_notify", "linger", "closed", "reaped"},
			"out\nbye\n\r\nattach-agent: session ended: idle for 200ms\r\n<exit 4>\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			client, agentSide := relaytest.TCPPair(t)
			p, err := Start(Spec{Argv: []string{"sh", "-c", tc.script}})
			if err != nil {
				t.Fatal(err)
			}
			var steps []string // written by Run's goroutine alone, read after it returns
			cfg := tc.cfg
			cfg.ExitMarker = func(code int) string { return fmt.Sprintf("<exit %d>\n", code) }
			cfg.Trace = func(s string) { steps = append(steps, s) }
			res := make(chan Result, 1)
			go func() { res <- Run(context.Background(), agentSide, p, cfg) }()
			got, err := io.ReadAll(client) // until close_notify
			if err != nil {
				t.Fatal(err)
			}
			_ = client.Close() // the client's end: the linger is over
			<-res
			if string(got) != tc.stream {
				t.Errorf("stream %q, want %q", got, tc.stream)
			}
			i := slices.Index(steps, tc.want[0])
			if i < 0 || !slices.Equal(steps[i:], tc.want) {
				t.Fatalf("steps %q: want them to end %q", steps, tc.want)
			}
			exited, outOver := slices.Index(steps, "exited"), slices.Index(steps, "output over")
			if exited < 0 || outOver < 0 || exited > i || outOver > i {
				t.Errorf("steps %q: the exit and the end of output come before the teardown", steps)
			}
			// The idle session ends first, then its process goes (SIGHUP).
			if e := slices.Index(steps, "ending: idle_timeout"); tc.name == "idle" && (e < 0 || e > exited) {
				t.Errorf("steps %q: the reason is recorded before the process is ended", steps)
			}
		})
	}
}

// slowWriter takes a byte every perByte: a client far slower than the
// drain timeout, on a stream (stderr) the test holds apart.
type slowWriter struct {
	perByte time.Duration
	mu      sync.Mutex
	buf     bytes.Buffer
}

func (w *slowWriter) Write(b []byte) (int, error) {
	time.Sleep(time.Duration(len(b)) * w.perByte) // the slow client, not a synchronisation
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.buf.Write(b)
}

func (w *slowWriter) bytes() []byte {
	w.mu.Lock()
	defer w.mu.Unlock()
	return bytes.Clone(w.buf.Bytes())
}

// Stderr of its own is drained as stdout is: what the process wrote to
// it before the exit reaches a slow client whole, however long past the
// drain timeout that takes (its pipe holds 64 KiB at the exit: a second
// at this client's 64 KiB/s, five times the timeout).
func TestSlowClientGetsTheStderrTail(t *testing.T) {
	data := make([]byte, 256<<10)
	_, _ = rand.Read(data)
	file := filepath.Join(t.TempDir(), "err")
	if err := os.WriteFile(file, data, 0o600); err != nil {
		t.Fatal(err)
	}
	client, agentSide := relaytest.TCPPair(t)
	p, err := Start(Spec{Argv: []string{"sh", "-c", `cat "$0" >&2; exit 3`, file}, SeparateStderr: true})
	if err != nil {
		t.Fatal(err)
	}
	errOut := &slowWriter{perByte: time.Second / (64 << 10)}
	res := make(chan Result, 1)
	go func() {
		res <- Run(context.Background(), agentSide, p, Config{Stderr: errOut, DrainTimeout: 200 * time.Millisecond})
	}()
	out, err := io.ReadAll(client)
	_ = client.Close()
	r := <-res
	got := errOut.bytes()
	if err != nil || len(out) != 0 || !bytes.Equal(got, data) {
		t.Fatalf("stderr: %d of %d bytes (equal %v); stdout %q, err %v", len(got), len(data), bytes.Equal(got, data), out, err)
	}
	if r.Reason != ReasonExited || r.ExitCode != 3 {
		t.Fatalf("result %+v", r)
	}
}

// What a pty holds beyond what TIOCINQ counts is within ttyBufferSlack,
// which the exit counts as owed: a kernel whose pty holds more fails here
// rather than cutting a slow client's tail.
func TestTTYBufferSlackCoversAPty(t *testing.T) {
	master, tty, err := pty.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer master.Close()
	defer tty.Close()
	if _, err := term.MakeRaw(int(tty.Fd())); err != nil {
		t.Fatal(err)
	}
	fd := int(tty.Fd())
	if err := unix.SetNonblock(fd, true); err != nil {
		t.Fatal(err)
	}
	// Fill it until it takes no more, giving the tty's flush work time to
	// move bytes on between tries (bounded: 200 tries of 1 ms).
	chunk := make([]byte, 4<<10)
	held := 0
	for try := 0; try < 200; try++ {
		n, err := unix.Write(fd, chunk)
		if n > 0 {
			held += n
			continue
		}
		if err != unix.EAGAIN {
			t.Fatalf("write to the pty: %v", err)
		}
		time.Sleep(time.Millisecond)
	}
	counted := queued(master, unix.TIOCINQ)
	t.Logf("a raw pty holds %d bytes, %d of them counted by TIOCINQ", held, counted)
	if held == 0 || held-counted > ttyBufferSlack {
		t.Fatalf("a raw pty holds %d bytes, TIOCINQ counts %d: more than ttyBufferSlack (%d) uncounted", held, counted, ttyBufferSlack)
	}
}

// The drain timeout bounds what a background child floods into stderr of
// its own after the exit, as it does stdout.
func TestDrainTimeoutBoundsStderrAfterExit(t *testing.T) {
	client, agentSide := relaytest.TCPPair(t)
	p, err := Start(Spec{Argv: []string{"sh", "-c", `(while :; do echo flood >&2; done) & exit 0`}, SeparateStderr: true})
	if err != nil {
		t.Fatal(err)
	}
	res := make(chan Result, 1)
	start := time.Now()
	go func() {
		res <- Run(context.Background(), agentSide, p, Config{Stderr: io.Discard, DrainTimeout: 300 * time.Millisecond, KillGrace: 300 * time.Millisecond})
	}()
	_, _ = io.ReadAll(client)
	_ = client.Close()
	select {
	case r := <-res:
		if took := time.Since(start); r.Reason != ReasonExited || took > 10*time.Second {
			t.Fatalf("result %+v after %v: a background writer held the session (drain timeout 300ms)", r, took)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("a background writer on stderr held the session for 30s (drain timeout 300ms)")
	}
}

// A byte the exit counted as owed on stderr of its own, but that a read
// begun before the exit took (so not off what is owed), is not owed for
// ever: the read that then finds the pipe empty ends what is owed, and a
// silent pipe held open by a background child ends the drain. Before, the
// drain waited on that byte, and Run on the drain, for good.
func TestStderrOverCountedAtTheExitEnds(t *testing.T) {
	_, agentSide := relaytest.TCPPair(t)
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close() // held open, silent: the background child
	cfg := Config{Stderr: io.Discard, DrainTimeout: 300 * time.Millisecond}.withDefaults()
	s := &session{s: agentSide, p: &Process{stderr: r}, cfg: cfg, start: time.Now()}
	s.errOut.f = r
	s.errOut.owed.Store(1) // what the race at the exit leaves
	s.exited.Store(true)
	_ = r.SetReadDeadline(time.Now().Add(cfg.DrainQuiet))
	done := make(chan error, 1)
	go func() { done <- s.copyStderr() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(30 * time.Second):
		_ = r.Close() // ends the copy
		<-done
		t.Fatal("stderr's drain still waited for an over-counted byte after 30s (drain timeout 300ms)")
	}
}
