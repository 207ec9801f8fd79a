package ptyio

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/attach-agent/attach-agent/internal/leakcheck"
	"github.com/attach-agent/attach-agent/internal/relaytest"
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
