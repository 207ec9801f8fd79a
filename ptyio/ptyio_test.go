package ptyio

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"io"
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
