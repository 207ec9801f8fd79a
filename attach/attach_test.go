package attach_test

import (
	"context"
	"errors"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/attach-agent/attach-agent/attach"
	"github.com/attach-agent/attach-agent/internal/leakcheck"
	"github.com/attach-agent/attach-agent/internal/proctest"
	"github.com/attach-agent/attach-agent/internal/relaytest"
	"github.com/attach-agent/attach-agent/tlsdial"
	"github.com/attach-agent/attach-agent/wire"
)

func TestMain(m *testing.M) { leakcheck.Main(m) }

// agentSide pairs as the dyno's end of u through the relay and runs
// script on its connection (what it reads, what it writes).
func agentSide(t *testing.T, env *relaytest.Env, u tlsdial.URL, script func(c *tlsdial.Conn)) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		c, err := tlsdial.Dial(context.Background(), u, env.Dial)
		if err != nil {
			t.Error(err)
			return
		}
		defer c.Close()
		if err := c.Pair(context.Background(), u.Secret, 20*time.Second); err != nil {
			t.Error(err)
			return
		}
		_ = c.SetDeadline(time.Now().Add(20 * time.Second))
		script(c)
	}()
	t.Cleanup(func() { <-done })
}

func session(t *testing.T, env *relaytest.Env, u tlsdial.URL, cfg attach.Config) *attach.Session {
	t.Helper()
	cfg.Dial = env.Dial
	s, err := attach.DialURL(context.Background(), u, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

// The Heroku wire: the input's end is 0x04 (or a half-close), the status
// comes from the marker, which the output never shows; without a marker
// Wait says there was no status.
func TestHerokuWire(t *testing.T) {
	env := relaytest.Start(t, nil)
	for _, tc := range []struct {
		name      string
		halfClose bool
		marker    bool
	}{{"eof byte, marker", false, true}, {"half-close, no marker", true, false}} {
		u := env.URL("v1-" + strings.ReplaceAll(tc.name, " ", ""))
		agentSide(t, env, u, func(c *tlsdial.Conn) {
			in, _ := io.ReadAll(io.LimitReader(c, 6))
			if !tc.halfClose && string(in) != "hello\x04" {
				t.Errorf("%s: agent read %q", tc.name, in)
			}
			if tc.halfClose {
				rest, _ := io.ReadAll(c) // up to the client's half-close
				if string(in)+string(rest) != "hello" {
					t.Errorf("%s: agent read %q", tc.name, string(in)+string(rest))
				}
			}
			_, _ = io.WriteString(c, "output\n")
			if tc.marker {
				_, _ = io.WriteString(c, wire.ExitStatusLine(3))
			}
			_ = c.CloseWrite()
		})
		s := session(t, env, u, attach.Config{HalfCloseAtEOF: tc.halfClose})
		var out proctest.Buffer
		s.Stdin, s.Stdout = strings.NewReader("hello"), &out
		if err := s.Start(); err != nil {
			t.Fatal(err)
		}
		err := s.Wait()
		var ee *attach.ExitError
		switch {
		case tc.marker && (!errors.As(err, &ee) || ee.Code != 3):
			t.Errorf("%s: Wait = %v, want status 3", tc.name, err)
		case !tc.marker && !errors.Is(err, attach.ErrNoStatus):
			t.Errorf("%s: Wait = %v, want ErrNoStatus", tc.name, err)
		}
		if out.String() != "output\n" {
			t.Errorf("%s: output %q", tc.name, out.String())
		}
		if err := s.Resize(80, 24); err == nil {
			t.Errorf("%s: Resize over the Heroku wire did not fail", tc.name)
		}
	}
}

// v2: a stream that ends before the exit frame is a lost link, never a
// status of 0; a silent agent is lost after the peer timeout.
func TestV2LinkLost(t *testing.T) {
	env := relaytest.Start(t, nil)
	u := env.URL("v2-cut")
	u.V2 = true
	agentSide(t, env, u, func(c *tlsdial.Conn) {
		_, _ = c.Write(wire.AppendFrame(nil, wire.FrameStdout, []byte("partial")))
		_ = c.CloseWrite()
	})
	s := session(t, env, u, attach.Config{})
	var out proctest.Buffer
	s.Stdout = &out
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	var le *attach.LinkError
	if err := s.Wait(); !errors.As(err, &le) || out.String() != "partial" {
		t.Errorf("Wait = %v, output %q: want a LinkError after the output", err, out.String())
	}

	u = env.URL("v2-silent")
	u.V2 = true
	release := make(chan struct{})
	agentSide(t, env, u, func(c *tlsdial.Conn) { <-release }) // pairs, then says nothing
	s = session(t, env, u, attach.Config{Keepalive: -1, PeerTimeout: 200 * time.Millisecond})
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	err := s.Wait()
	close(release)
	if !errors.As(err, &le) || !strings.Contains(err.Error(), "peer timeout") {
		t.Errorf("Wait = %v, want a LinkError for the peer timeout", err)
	}
}
