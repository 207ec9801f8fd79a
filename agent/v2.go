package agent

import (
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/attach-agent/attach-agent/ptyio"
	"github.com/attach-agent/attach-agent/tlsdial"
	"github.com/attach-agent/attach-agent/wire"
)

// Defaults of a v2 session's keepalive (Spec.Keepalive, Spec.PeerTimeout).
const (
	DefaultKeepalive   = 15 * time.Second
	DefaultPeerTimeout = 45 * time.Second
)

// v2Stream is the session's end of protocol v2 over the paired
// connection, as the pump's stream: reads are the client's stdin frames
// (a resize resizes the pty, a ping is answered, the stdin EOF frame is
// the end of input, a hang-up frame or the stream's end the client's
// going, unknown frames skipped); writes are stdout frames, and Stderr
// writes stderr frames. At the end, Ending writes the ends of both
// output streams, the exit and the end reason, in that order, before the
// pump's close_notify.
type v2Stream struct {
	*tlsdial.Conn
	fr      *wire.FrameReader
	fw      *wire.FrameWriter
	resize  func(cols, rows uint16)
	pending []byte
	ended   bool // stdin's EOF frame came

	ka       *wire.Keepalive
	dead     atomic.Bool // the peer timeout passed
	stop     chan struct{}
	stopOnce sync.Once
}

func newV2Stream(c *tlsdial.Conn, keepalive, peerTimeout time.Duration) *v2Stream {
	if keepalive == 0 {
		keepalive = DefaultKeepalive
	}
	if peerTimeout == 0 {
		peerTimeout = DefaultPeerTimeout
	}
	s := &v2Stream{Conn: c, fr: wire.NewFrameReader(c.Conn), fw: &wire.FrameWriter{W: c}, stop: make(chan struct{}),
		ka: &wire.Keepalive{Every: keepalive, PeerTimeout: peerTimeout}}
	s.ka.Heard()
	go s.ka.Run(func() { _ = s.fw.Write(wire.FramePing, nil) }, func() {
		s.dead.Store(true)
		_ = s.Conn.SetReadDeadline(time.Now()) // the input side ends with errPeerDead
	}, s.stop)
	return s
}

// errPeerDead is a client not heard for the peer timeout.
var errPeerDead = errors.New("nothing heard from the client for the peer timeout (v2 keepalive)")

func (s *v2Stream) Read(p []byte) (int, error) {
	for {
		if len(s.pending) > 0 {
			n := copy(p, s.pending)
			s.pending = s.pending[n:]
			return n, nil
		}
		t, payload, err := s.fr.Next()
		if err != nil {
			if s.dead.Load() {
				return 0, fmt.Errorf("%w (%v)", errPeerDead, s.ka.PeerTimeout)
			}
			if errors.Is(err, io.EOF) {
				return 0, ptyio.ErrHangUp // the stream's end without a hang-up frame: gone all the same
			}
			return 0, err
		}
		s.ka.Heard()
		switch t {
		case wire.FrameStdin:
			if s.ended {
				continue // after its own EOF: the client's mistake, dropped
			}
			n := copy(p, payload)
			s.pending = append(s.pending[:0], payload[n:]...)
			if n > 0 {
				return n, nil
			}
		case wire.FrameEOF:
			if len(payload) == 1 && wire.Stream(payload[0]) == wire.StreamStdin && !s.ended {
				s.ended = true
				return 0, ptyio.ErrEndOfInput
			}
		case wire.FrameResize:
			if cols, rows, err := wire.ParseResize(payload); err == nil && cols > 0 && rows > 0 && s.resize != nil {
				s.resize(cols, rows)
			}
		case wire.FramePing:
			if wire.ParsePing(payload) == nil {
				_ = s.fw.Write(wire.FramePong, payload) // a write error shows on the output side
			}
		case wire.FrameHangup:
			return 0, ptyio.ErrHangUp
		}
	}
}

func (s *v2Stream) Write(p []byte) (int, error) {
	if err := s.fw.Write(wire.FrameStdout, p); err != nil {
		return 0, err
	}
	return len(p), nil
}

// Stderr is the writer of stderr frames.
func (s *v2Stream) Stderr() io.Writer { return stderrWriter{s} }

type stderrWriter struct{ s *v2Stream }

func (w stderrWriter) Write(p []byte) (int, error) {
	if err := w.s.fw.Write(wire.FrameStderr, p); err != nil {
		return 0, err
	}
	return len(p), nil
}

// Ending writes the session's end in order: the ends of stdout and
// stderr, the exit, the reason.
func (s *v2Stream) Ending(e ptyio.Ending) error {
	s.stopOnce.Do(func() { close(s.stop) })
	for _, st := range []wire.Stream{wire.StreamStdout, wire.StreamStderr} {
		if err := s.fw.Write(wire.FrameEOF, []byte{byte(st)}); err != nil {
			return err
		}
	}
	if err := s.fw.Write(wire.FrameExit, exitOf(e.Code, e.Signal, e.CoreDumped).Payload()); err != nil {
		return err
	}
	return s.fw.Write(wire.FrameReason, wire.ReasonPayload(string(e.Reason), e.Notice))
}

func (s *v2Stream) Close() error {
	s.stopOnce.Do(func() { close(s.stop) })
	return s.Conn.Close()
}

func exitOf(code int, sig syscall.Signal, core bool) wire.Exit {
	if sig != 0 {
		return wire.Exit{Code: 128 + int(sig), Signal: int(sig), CoreDumped: core}
	}
	return wire.Exit{Code: code}
}

// tellClientV2 is tellClient for v2: the reason and the exit as frames.
func tellClientV2(conn *tlsdial.Conn, reason ptyio.Reason, err error, code int) {
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	fw := &wire.FrameWriter{W: conn}
	for _, st := range []wire.Stream{wire.StreamStdout, wire.StreamStderr} {
		if fw.Write(wire.FrameEOF, []byte{byte(st)}) != nil {
			return
		}
	}
	if fw.Write(wire.FrameExit, wire.Exit{Code: code}.Payload()) != nil {
		return
	}
	if fw.Write(wire.FrameReason, wire.ReasonPayload(string(reason), "attach-agent: "+err.Error())) != nil {
		return
	}
	_ = conn.CloseWrite()
	_ = conn.SetReadDeadline(time.Now().Add(time.Second))
	_, _ = io.Copy(io.Discard, conn)
}
