// Package attach is the client side of a session, for programs: dial an
// attach_url and get the remote command's stdin, stdout and stderr, its
// window size, its end of input, a hang-up and its exit status, in the
// shape x/crypto/ssh's Session has. Protocol v2 (an attach URL ending in
// #v2) carries all of that in band; over the Heroku wire (no #v2) stdout
// and stderr come merged, the end of input is the byte 0x04 and the exit
// status needs the command's marker line (exit_status_marker).
//
// It dials and speaks; it starts no process and knows no terminal (the
// connect command adds those).
//
//	s, err := attach.Dial(ctx, "rendezvous://relay.example.com:5000/SECRET#v2", attach.Config{})
//	if err != nil {
//		return err
//	}
//	defer s.Close()
//	s.Stdin = strings.NewReader("select 1;\n")
//	s.Stdout, s.Stderr = os.Stdout, os.Stderr
//	if err := s.Start(); err != nil {
//		return err
//	}
//	err = s.Wait() // nil: exit 0; *attach.ExitError: another status; *attach.LinkError: the link was lost
package attach

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"

	"github.com/attach-agent/attach-agent/tlsdial"
	"github.com/attach-agent/attach-agent/wire"
)

// Defaults of a v2 session's keepalive.
const (
	DefaultKeepalive   = 15 * time.Second
	DefaultPeerTimeout = 45 * time.Second
)

// Config is how to reach the relay and, for v2, how to keep the link.
type Config struct {
	Dial tlsdial.Config
	// Keepalive is how often a v2 session pings the agent; zero:
	// DefaultKeepalive, negative: never.
	Keepalive time.Duration
	// PeerTimeout: nothing heard from the agent this long (pings are
	// answered) and the link counts as lost; zero: DefaultPeerTimeout,
	// negative: never.
	PeerTimeout time.Duration
	// Cols and Rows, when set, are the window size sent at the start (v2).
	Cols, Rows uint16
	// HalfCloseAtEOF, over the Heroku wire, ends the input with a
	// half-close instead of 0x04 (for sessions that take a half-close as
	// their end of input: binary pipes, a raw pty). v2 has its EOF frame.
	HalfCloseAtEOF bool
}

// Session is one paired session. Set Stdin, Stdout and Stderr before
// Start; nil means nothing to send, and discard.
type Session struct {
	Stdin  io.Reader
	Stdout io.Writer
	Stderr io.Writer // v2; over the Heroku wire stderr arrives in Stdout

	url  tlsdial.URL
	cfg  Config
	conn *tlsdial.Conn
	fw   *wire.FrameWriter

	started   bool
	stdinOnce sync.Once
	ka        *wire.Keepalive
	done      chan struct{}
	err       error // Wait's, set before done closes
	closeOnce sync.Once
}

// ExitError is a session that ended with a status other than 0, or with
// an end reason of the agent's (timeouts, the operator), or both.
type ExitError struct {
	wire.Exit
	// Reason is the session's end reason as the agent names it ("exited",
	// "idle_timeout", "killed", ...; docs/API.md), Message its words for
	// people. Empty over the Heroku wire.
	Reason, Message string
}

func (e *ExitError) Error() string {
	s := fmt.Sprintf("remote command exited with status %d", e.Code)
	if e.Signal != 0 {
		s = fmt.Sprintf("remote command killed by signal %d", e.Signal)
		if e.CoreDumped {
			s += " (core dumped)"
		}
	}
	if e.Reason != "" && e.Reason != "exited" {
		s += ": session ended: " + e.Reason
		if e.Message != "" {
			s += ": " + e.Message
		}
	}
	return s
}

// ExitStatus is the status a shell would report: the code, or 128+N.
func (e *ExitError) ExitStatus() int { return e.Code }

// LinkError is a session whose link ended before its status came: the
// relay or agent went, or nothing was heard for the peer timeout.
type LinkError struct{ Err error }

func (e *LinkError) Error() string { return "link to the session lost: " + e.Err.Error() }
func (e *LinkError) Unwrap() error { return e.Err }

// ErrNoStatus is Wait's error for a Heroku-wire session whose output
// carried no exit-status marker: it ended, with a status nobody told.
var ErrNoStatus = errors.New("the session ended without an exit status (the Heroku wire has one only with the exit-status marker)")

// Dial reaches the relay and pairs with the agent's side of attachURL.
func Dial(ctx context.Context, attachURL string, cfg Config) (*Session, error) {
	u, err := tlsdial.Parse(attachURL)
	if err != nil {
		return nil, err
	}
	return DialURL(ctx, u, cfg)
}

// DialURL is Dial for a parsed URL.
func DialURL(ctx context.Context, u tlsdial.URL, cfg Config) (*Session, error) {
	conn, err := tlsdial.Dial(ctx, u, cfg.Dial)
	if err != nil {
		return nil, err
	}
	if err := conn.Pair(ctx, u.Secret, cfg.Dial.PairTimeout); err != nil {
		_ = conn.Close()
		return nil, err
	}
	s := &Session{url: u, cfg: cfg, conn: conn, done: make(chan struct{})}
	if u.V2 {
		s.fw = &wire.FrameWriter{W: conn}
	}
	return s, nil
}

// V2 reports whether the session speaks protocol v2.
func (s *Session) V2() bool { return s.url.V2 }

// Start begins moving bytes: Stdin to the command (its end is the
// command's end of input), the command's output to Stdout and Stderr.
func (s *Session) Start() error {
	if s.started {
		return errors.New("attach: Start called twice")
	}
	s.started = true
	if s.Stdout == nil {
		s.Stdout = io.Discard
	}
	if s.Stderr == nil {
		s.Stderr = io.Discard
	}
	if s.url.V2 {
		if s.cfg.Cols > 0 && s.cfg.Rows > 0 {
			if err := s.Resize(int(s.cfg.Cols), int(s.cfg.Rows)); err != nil {
				return err
			}
		}
		every, dead := s.cfg.Keepalive, s.cfg.PeerTimeout
		if every == 0 {
			every = DefaultKeepalive
		}
		if dead == 0 {
			dead = DefaultPeerTimeout
		}
		s.ka = &wire.Keepalive{Every: every, PeerTimeout: dead}
		s.ka.Heard()
		go s.ka.Run(func() { _ = s.fw.Write(wire.FramePing, nil) }, func() {
			_ = s.conn.SetReadDeadline(time.Now()) // readV2 ends with the LinkError
		}, s.done)
		go s.readV2()
	} else {
		go s.readV1()
	}
	go s.copyStdin()
	return nil
}

func (s *Session) copyStdin() {
	if s.Stdin == nil {
		_ = s.CloseStdin()
		return
	}
	// A read and its frame header fill two whole TLS records.
	buf := make([]byte, 32<<10-wire.HeaderLen)
	for {
		n, err := s.Stdin.Read(buf)
		if n > 0 {
			var werr error
			if s.fw != nil {
				werr = s.fw.Write(wire.FrameStdin, buf[:n])
			} else {
				_, werr = s.conn.Write(buf[:n])
			}
			if werr != nil {
				return // the link is gone: Wait says so
			}
		}
		if err != nil {
			_ = s.CloseStdin() // io.EOF or not, the input is over
			return
		}
	}
}

// CloseStdin ends the command's input (once): an EOF frame (v2), or 0x04
// (the Heroku wire, as the Heroku CLI sends at Ctrl-D; a half-close with
// HalfCloseAtEOF).
func (s *Session) CloseStdin() error {
	var err error
	s.stdinOnce.Do(func() {
		switch {
		case s.fw != nil:
			err = s.fw.Write(wire.FrameEOF, []byte{byte(wire.StreamStdin)})
		case s.cfg.HalfCloseAtEOF:
			err = s.conn.CloseWrite()
		default:
			_, err = s.conn.Write([]byte{0x04})
		}
	})
	return err
}

// Resize tells the command's pty its window size (v2; the Heroku wire has
// no way to).
func (s *Session) Resize(cols, rows int) error {
	if s.fw == nil {
		return errors.New("attach: resize needs protocol v2 (an attach URL ending in #v2)")
	}
	if cols <= 0 || rows <= 0 || cols > 65535 || rows > 65535 {
		return fmt.Errorf("attach: window %dx%d out of range 1..65535", cols, rows)
	}
	return s.fw.Write(wire.FrameResize, wire.Resize(uint16(cols), uint16(rows)))
}

// Hangup tells the agent the client is going (v2: a hang-up frame; the
// Heroku wire: the connection's end): the command gets SIGHUP, and its
// output up to then still comes.
func (s *Session) Hangup() error {
	if s.fw != nil {
		return s.fw.Write(wire.FrameHangup, nil)
	}
	return s.conn.CloseWrite()
}

// Wait waits for the session's end: nil for an exit with status 0,
// *ExitError for any other status or an end reason of the agent's,
// *LinkError when the link ended before the status came.
func (s *Session) Wait() error {
	if !s.started {
		return errors.New("attach: Wait before Start")
	}
	<-s.done
	return s.err
}

// Close ends the link at once.
func (s *Session) Close() error {
	var err error
	s.closeOnce.Do(func() { err = s.conn.Close() })
	return err
}

func (s *Session) finish(err error) {
	s.err = err
	close(s.done)
	_ = s.Close()
}

// readV1 copies the Heroku wire's stream to Stdout, taking out the
// exit-status marker.
func (s *Session) readV1() {
	filter := &wire.StatusFilter{W: s.Stdout}
	_, err := io.Copy(filter, s.conn)
	if ferr := filter.Flush(); err == nil {
		err = ferr
	}
	switch {
	case err != nil && !errors.Is(err, net.ErrClosed):
		s.finish(&LinkError{err})
	case !filter.Found:
		s.finish(ErrNoStatus)
	case filter.Status != 0:
		s.finish(&ExitError{Exit: wire.Exit{Code: filter.Status}})
	default:
		s.finish(nil)
	}
}

// readV2 reads the agent's frames until its end: output to Stdout and
// Stderr, pings answered, the exit and the reason kept; unknown frames are
// skipped.
func (s *Session) readV2() {
	fr := wire.NewFrameReader(s.conn)
	var exit *wire.Exit
	var reason, message string
	for {
		t, p, err := fr.Next()
		if err != nil {
			switch {
			case errors.Is(err, io.EOF) && exit != nil:
				ee := &ExitError{Exit: *exit, Reason: reason, Message: message}
				if exit.Code == 0 && exit.Signal == 0 && (reason == "" || reason == "exited") {
					s.finish(nil)
				} else {
					s.finish(ee)
				}
			case errors.Is(err, io.EOF):
				s.finish(&LinkError{errors.New("the agent's stream ended with no exit status")})
			default:
				if d := s.peerDead(); d != nil {
					err = d
				}
				s.finish(&LinkError{err})
			}
			return
		}
		s.ka.Heard()
		var werr error
		switch t {
		case wire.FrameStdout:
			_, werr = s.Stdout.Write(p)
		case wire.FrameStderr:
			_, werr = s.Stderr.Write(p)
		case wire.FramePing:
			if wire.ParsePing(p) == nil {
				werr = s.fw.Write(wire.FramePong, p)
			}
		case wire.FrameExit:
			e, perr := wire.ParseExit(p)
			if perr == nil {
				exit = &e
			}
		case wire.FrameReason:
			reason, message = wire.ParseReason(p)
		}
		if werr != nil && (t == wire.FrameStdout || t == wire.FrameStderr) {
			s.finish(fmt.Errorf("attach: writing the output: %w", werr))
			return
		}
	}
}

// peerDead is the error for an agent not heard for the peer timeout.
func (s *Session) peerDead() error {
	if quiet, dead := s.ka.Quiet(); dead {
		return fmt.Errorf("nothing heard from the agent for %v (peer timeout %v)", quiet.Round(time.Millisecond), s.ka.PeerTimeout)
	}
	return nil
}
