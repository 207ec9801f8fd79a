package agent_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/attach-agent/attach-agent/agent"
	"github.com/attach-agent/attach-agent/attach"
	"github.com/attach-agent/attach-agent/internal/proctest"
	"github.com/attach-agent/attach-agent/ptyio"
	"github.com/attach-agent/attach-agent/tlsdial"
	"github.com/attach-agent/attach-agent/wire"
)

// v2 starts spec's session over protocol v2 and pairs the attach package's
// client with it.
func (h *harness) v2(t *testing.T, spec agent.Spec, cfg attach.Config) (*attach.Session, <-chan agent.Result) {
	t.Helper()
	spec.URL = h.url()
	spec.URL.V2 = true
	u, res := h.session(t, spec)
	cfg.Dial = h.dial
	s, err := attach.DialURL(context.Background(), u, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s, res
}

// v2Run runs spec's session over protocol v2 to its end, nothing sent on
// stdin, and returns what the client got on each stream, the agent's result and
// Wait's error.
func (h *harness) v2Run(t *testing.T, spec agent.Spec) (stdout, stderr string, r agent.Result, waitErr error) {
	t.Helper()
	s, res := h.v2(t, spec, attach.Config{})
	var out, errOut proctest.Buffer
	s.Stdout, s.Stderr = &out, &errOut
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	waitErr = s.Wait()
	r = wait(t, res, 30*time.Second)
	return out.String(), errOut.String(), r, waitErr
}

// stdout and stderr apart, the exit status with no marker, a signal.
func TestV2StreamsAndStatus(t *testing.T) {
	h := newHarness(t, nil)
	for _, tc := range []struct {
		script, out, errOut string
		code, sig           int
	}{
		{"echo out; echo err >&2; echo more; exit 3", "out\nmore\n", "err\n", 3, 0},
		{"echo dying >&2; kill -9 $$", "", "dying\n", 137, 9},
		{"echo fine", "fine\n", "", 0, 0},
	} {
		out, errOut, r, err := h.v2Run(t, agent.Spec{Process: ptyio.Spec{Argv: sh(tc.script)}})
		var ee *attach.ExitError
		switch {
		case tc.code == 0 && err != nil:
			t.Errorf("%s: Wait = %v, want nil", tc.script, err)
		case tc.code != 0 && (!errors.As(err, &ee) || ee.Code != tc.code || ee.Signal != tc.sig || ee.Reason != "exited"):
			t.Errorf("%s: Wait = %v, want status %d signal %d", tc.script, err, tc.code, tc.sig)
		}
		if out != tc.out || errOut != tc.errOut {
			t.Errorf("%s: stdout %q stderr %q, want %q %q", tc.script, out, errOut, tc.out, tc.errOut)
		}
		if r.Reason != ptyio.ReasonExited || r.ExitCode != tc.code {
			t.Errorf("%s: agent result %v", tc.script, r)
		}
	}
}

// The end of input is in band: the command sees EOF and goes on writing;
// 0x04 and 0xff are bytes like any other, 16 MiB each way.
func TestV2EndOfInputAndBinary(t *testing.T) {
	h := newHarness(t, nil)
	s, res := h.v2(t, agent.Spec{Process: ptyio.Spec{Argv: sh("cat; echo after the end")}}, attach.Config{})
	var out proctest.Buffer
	s.Stdin, s.Stdout = strings.NewReader("data\x04\xff"), &out
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	if err := s.Wait(); err != nil {
		t.Fatal(err)
	}
	if got := out.String(); got != "data\x04\xffafter the end\n" {
		t.Errorf("output %q", got)
	}
	wait(t, res, 30*time.Second)

	data := randomBytes(16 << 20)
	for i := 0; i < len(data); i += 4096 {
		data[i], data[i+1] = 0x04, 0xff
	}
	s, res = h.v2(t, agent.Spec{Process: ptyio.Spec{Argv: []string{"cat"}}}, attach.Config{})
	hs := sha256.New()
	cw := &countingWriter{w: hs}
	s.Stdin, s.Stdout = bytes.NewReader(data), cw
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	if err := s.Wait(); err != nil {
		t.Fatal(err)
	}
	if want := sha256.Sum256(data); cw.n != int64(len(data)) || !bytes.Equal(hs.Sum(nil), want[:]) {
		t.Fatalf("echo of 16 MiB: %d bytes back, sha256 match %v", cw.n, bytes.Equal(hs.Sum(nil), want[:]))
	}
	if r := wait(t, res, 60*time.Second); r.BytesIn != int64(len(data)) || r.BytesOut != int64(len(data)) {
		t.Errorf("agent counted in %d out %d, want %d each", r.BytesIn, r.BytesOut, len(data))
	}
}

type countingWriter struct {
	w io.Writer
	n int64
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}

// The size at the start and a resize reach the pty: stty inside sees each
// (each read after a line the client sends behind the frame, so the
// order is the wire's).
func TestV2Resize(t *testing.T) {
	h := newHarness(t, nil)
	s, res := h.v2(t, agent.Spec{Process: ptyio.Spec{Argv: sh("read x; stty size; read y; stty size"), TTY: true}}, attach.Config{Cols: 120, Rows: 30})
	pr, pw := io.Pipe()
	var out proctest.Buffer
	s.Stdin, s.Stdout = pr, &out
	if err := s.Start(); err != nil { // the size at the start goes before any input
		t.Fatal(err)
	}
	_, _ = io.WriteString(pw, "\n")
	proctest.WaitFor(t, 20*time.Second, "stty size 30 120", func() bool { return strings.Contains(out.String(), "30 120") })
	if err := s.Resize(90, 20); err != nil {
		t.Fatal(err)
	}
	_, _ = io.WriteString(pw, "\n")
	proctest.WaitFor(t, 20*time.Second, "stty size 20 90", func() bool { return strings.Contains(out.String(), "20 90") })
	_ = pw.Close()
	if err := s.Wait(); err != nil {
		t.Fatalf("Wait: %v (output %q)", err, out.String())
	}
	wait(t, res, 30*time.Second)
}

// A hang-up ends the command (SIGHUP) while its output still comes.
func TestV2Hangup(t *testing.T) {
	h := newHarness(t, nil)
	s, res := h.v2(t, agent.Spec{Process: ptyio.Spec{Argv: sh("trap 'echo hung up; exit 7' HUP; echo ready; while :; do sleep 0.05; done")}}, attach.Config{})
	pr, pw := io.Pipe()
	defer pw.Close()
	var out proctest.Buffer
	s.Stdin, s.Stdout = pr, &out
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	proctest.WaitFor(t, 20*time.Second, "the command ready", func() bool { return strings.Contains(out.String(), "ready") })
	if err := s.Hangup(); err != nil {
		t.Fatal(err)
	}
	err := s.Wait()
	var ee *attach.ExitError
	if !errors.As(err, &ee) || ee.Code != 7 || ee.Reason != string(ptyio.ReasonClientGone) {
		t.Errorf("Wait = %v, want status 7, reason client_gone", err)
	}
	if out.String() != "ready\nhung up\n" {
		t.Errorf("output %q", out.String())
	}
	if r := wait(t, res, 30*time.Second); r.Reason != ptyio.ReasonClientGone || r.ExitCode != 7 {
		t.Errorf("agent result %v", r)
	}
}

// rawV2 pairs a client that speaks frames by hand.
func (h *harness) rawV2(t *testing.T, spec agent.Spec) (*tlsdial.Conn, <-chan agent.Result) {
	t.Helper()
	spec.URL = h.url()
	spec.URL.V2 = true
	u, res := h.session(t, spec)
	return h.client(t, u), res
}

// At the end, in this order: all output, the end of stdout and stderr,
// the exit, the reason, close_notify; a frame of a type the agent does not
// know is skipped.
func TestV2FrameOrderAtTheEnd(t *testing.T) {
	h := newHarness(t, nil)
	c, res := h.rawV2(t, agent.Spec{Process: ptyio.Spec{Argv: sh("cat; echo bye >&2; exit 4")}})
	var in []byte
	in = wire.AppendFrame(in, wire.FrameType(0x7e), []byte("a frame from a later version"))
	in = wire.AppendFrame(in, wire.FrameStdin, []byte("x\n"))
	in = wire.AppendFrame(in, wire.FrameEOF, []byte{byte(wire.StreamStdin)})
	if _, err := c.Write(in); err != nil {
		t.Fatal(err)
	}
	fr := wire.NewFrameReader(c)
	var got []string
	var out, errOut string
	for {
		ft, p, err := fr.Next()
		if errors.Is(err, io.EOF) {
			got = append(got, "close_notify")
			break
		}
		if err != nil {
			t.Fatalf("after %v: %v", got, err)
		}
		switch ft {
		case wire.FrameStdout, wire.FrameStderr:
			// Two pipes: their frames interleave in no set order, as SSH's
			// channels do; all of them come before the end.
			if ft == wire.FrameStdout {
				out += string(p)
			} else {
				errOut += string(p)
			}
			if len(got) == 0 || got[len(got)-1] != "output" {
				got = append(got, "output")
			}
		case wire.FrameEOF:
			got = append(got, "eof "+map[byte]string{1: "stdout", 2: "stderr"}[p[0]])
		case wire.FrameExit:
			e, err := wire.ParseExit(p)
			if err != nil || e.Code != 4 {
				t.Errorf("exit %+v, %v", e, err)
			}
			got = append(got, "exit")
		case wire.FrameReason:
			if r, _ := wire.ParseReason(p); r != "exited" {
				t.Errorf("reason %q", r)
			}
			got = append(got, "reason")
		case wire.FramePing:
			_, _ = c.Write(wire.AppendFrame(nil, wire.FramePong, p))
		}
	}
	want := []string{"output", "eof stdout", "eof stderr", "exit", "reason", "close_notify"}
	if strings.Join(got, ",") != strings.Join(want, ",") || out != "x\n" || errOut != "bye\n" {
		t.Errorf("frames %v (stdout %q stderr %q), want %v", got, out, errOut, want)
	}
	wait(t, res, 30*time.Second)
}

// A client that goes silent (no frame, no pong) is found by the keepalive
// bound and its session ends as client_gone.
func TestV2DeadPeer(t *testing.T) {
	h := newHarness(t, nil)
	c, res := h.rawV2(t, agent.Spec{Process: ptyio.Spec{Argv: []string{"sleep", "60"}}, Keepalive: 50 * time.Millisecond, PeerTimeout: 300 * time.Millisecond})
	defer c.Close() // open, but silent: it never answers a ping
	r := wait(t, res, 30*time.Second)
	if r.Reason != ptyio.ReasonClientGone || r.Err == nil || !strings.Contains(r.Err.Error(), "peer timeout") {
		t.Fatalf("result %v: want client_gone for the peer timeout", r)
	}
}
