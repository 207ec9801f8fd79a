package ptyio

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"runtime/debug"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Stream is the network side of a session: a connection that can end its
// writing half (TLS close_notify or TCP FIN) while it still reads.
type Stream interface {
	net.Conn
	CloseWrite() error
}

// Reason is why a session ended. Run returns the first six; the agent adds
// the ones that happen before a process exists.
type Reason string

const (
	ReasonExited      Reason = "exited"       // the process exited and its output was delivered
	ReasonClientGone  Reason = "client_gone"  // the stream broke (reset, write error)
	ReasonIdle        Reason = "idle_timeout" // nothing moved and nothing was queued for IdleTimeout
	ReasonMaxDuration Reason = "max_duration" // the session ran for MaxDuration
	ReasonStalled     Reason = "stalled"      // output could not be written for StallTimeout
	ReasonKilled      Reason = "killed"       // ended from outside (context cancelled)
	ReasonShutdown    Reason = "shutdown"     // the agent is shutting down
	ReasonAgentError  Reason = "agent_error"  // a bug in the agent (a panic) ended this session alone
)

// PanicError is a panic recovered in one of a session's goroutines: it
// ends that session (ReasonAgentError) and nothing else.
type PanicError struct {
	Where string // which goroutine
	Value any
	Stack []byte
}

func (e *PanicError) Error() string { return fmt.Sprintf("panic in %s: %v", e.Where, e.Value) }

// Recovered turns a panic recovered by a session's goroutine (the value
// recover returned; nil: none) into a *PanicError with its stack.
func Recovered(where string, v any) error {
	if v == nil {
		return nil
	}
	return &PanicError{Where: where, Value: v, Stack: debug.Stack()}
}

// ErrShutdown as the cancel cause of Run's context records ReasonShutdown
// instead of ReasonKilled.
var ErrShutdown = errors.New("agent shutting down")

// Defaults for Config; each is what a zero field means.
const (
	DefaultIdleTimeout  = time.Hour
	DefaultStallTimeout = time.Minute
	DefaultMaxDuration  = 24 * time.Hour
	DefaultDrainTimeout = 2 * time.Second
	DefaultDrainQuiet   = 100 * time.Millisecond
	DefaultLinger       = 2 * time.Second
	DefaultTermDelay    = time.Second
	DefaultKillGrace    = 5 * time.Second
	// BufSize is each direction's buffer, reused for the session's life.
	BufSize = 32 << 10
	// maxEmptyReads bounds consecutive reads that bring neither bytes nor
	// an error (the close_notify busy-loop incident).
	maxEmptyReads = 64
)

// Config bounds a session's pump. Zero durations mean the defaults above;
// IdleTimeout and MaxDuration may be negative to turn them off. Its bounds
// marshal to JSON (a daemon hands them to a worker); the funcs do not.
type Config struct {
	IdleTimeout  time.Duration // no byte moved either way and nothing queued in the kernel
	StallTimeout time.Duration // one write of output to the stream blocked this long
	MaxDuration  time.Duration // whole session
	DrainTimeout time.Duration // after the process exits, at most this long to copy what is left
	DrainQuiet   time.Duration // after the process exits, this long with no output ends the drain
	Linger       time.Duration // after our close_notify, wait this long for the client's own end
	TermDelay    time.Duration // SIGHUP, then SIGTERM after this
	KillGrace    time.Duration // SIGTERM, then SIGKILL after this

	// EOFByte: in pipes mode, 0x04 from the client ends the process's input
	// (the Heroku CLI sends it at the end of its stdin). Ignored with a pty,
	// whose line discipline does the same.
	EOFByte bool
	// ExitMarker, when set, formats the line written after all output
	// with the exit status (one Write, never split).
	ExitMarker func(code int) string `json:"-"`
	// Unsent reports bytes the socket has not sent yet (see SocketUnsent);
	// such bytes are activity for the idle timeout. Nil: not counted.
	Unsent func() int `json:"-"`
	// Name is the session's ID, for the client's notice of an internal
	// error.
	Name string
	// Trace, for tests, is told each step of the pump as it happens
	// ("exited", "input over", "output over", "ending: REASON", then the
	// teardown's "drained", "notice", "marker", "close_notify", "linger",
	// "closed", "reaped"). Nil in production.
	Trace func(step string) `json:"-"`
	// Fault, for tests, is called at named points of the pump's
	// goroutines ("input", "output"); a panic there is recovered as any
	// other. Nil in production.
	Fault func(point string) `json:"-"`
	// Ending, when set, writes the session's end to the stream in place of
	// the notice line and the exit marker (protocol v2's frames), after
	// all output and before close_notify.
	Ending func(Ending) error `json:"-"`
	// Stderr, when set and the process has a stderr of its own
	// (Spec.SeparateStderr), takes that output (protocol v2's stderr
	// frames) under the same bounds as stdout's.
	Stderr io.Writer `json:"-"`
	// WriteOverhead is what the stream adds to each Write (protocol v2's
	// frame header): output is read in pieces that small less, so that a
	// full read and its header fill whole TLS records instead of spilling a
	// few bytes into one more.
	WriteOverhead int `json:"-"`
	// FirstOutput, when set, is called once, after the first output byte
	// was written to the stream (from the output goroutine: it must not
	// block).
	FirstOutput func() `json:"-"`
}

func (c Config) withDefaults() Config {
	d := func(v *time.Duration, def time.Duration) {
		if *v == 0 {
			*v = def
		}
	}
	d(&c.IdleTimeout, DefaultIdleTimeout)
	d(&c.StallTimeout, DefaultStallTimeout)
	d(&c.MaxDuration, DefaultMaxDuration)
	d(&c.DrainTimeout, DefaultDrainTimeout)
	d(&c.DrainQuiet, DefaultDrainQuiet)
	d(&c.Linger, DefaultLinger)
	d(&c.TermDelay, DefaultTermDelay)
	d(&c.KillGrace, DefaultKillGrace)
	return c
}

// Validate reports a field that cannot work.
func (c Config) Validate() error {
	for name, v := range map[string]time.Duration{
		"stall timeout": c.StallTimeout, "drain timeout": c.DrainTimeout, "drain quiet": c.DrainQuiet,
		"linger": c.Linger, "term delay": c.TermDelay, "kill grace": c.KillGrace,
	} {
		if v < 0 {
			return fmt.Errorf("%s is negative (%v): use a positive duration, or zero for the default", name, v)
		}
	}
	// Each read of the drain gets DrainQuiet: one shorter than a wake-up
	// would time out before it reads, and the drain would spin.
	if c.DrainQuiet > 0 && c.DrainQuiet < minDrainQuiet {
		return fmt.Errorf("drain quiet %v is under %v, too short for a read to happen in: use %v or more, or zero for the default (%v)",
			c.DrainQuiet, minDrainQuiet, minDrainQuiet, DefaultDrainQuiet)
	}
	return nil
}

const minDrainQuiet = time.Millisecond

// Result is what happened to a session once Run returns.
type Result struct {
	Reason   Reason
	ExitCode int            // the process's status (128+N for signal N)
	Signal   syscall.Signal // the signal that ended it, if any
	BytesIn  int64          // client -> process
	BytesOut int64          // process -> client (notices and the marker excluded)
	// FirstOutput is the time from Run's start to the first output byte
	// written to the stream; zero if there was none.
	FirstOutput time.Duration
	// EmptyReads counts reads that returned neither bytes nor an error.
	EmptyReads int64
	// Err says more about a Reason other than exited; nil otherwise.
	Err error
}

type session struct {
	s     Stream
	p     *Process
	cfg   Config
	start time.Time

	lastActive atomic.Int64 // ns since start: the one thing both directions share
	bytesIn    atomic.Int64
	bytesOut   atomic.Int64
	firstOut   atomic.Int64
	empty      atomic.Int64
	exited     atomic.Bool  // set before the drain deadline is first armed
	exitedAt   atomic.Int64 // ns since start
	out        drain        // the pty master, or the stdout pipe (stderr too unless apart)
	errOut     drain        // the stderr pipe of its own (Spec.SeparateStderr), if any
}

// drain is one of the process's output streams after the exit. What the
// process had written to it, and not yet been read, when it exited is
// owed: it goes out however long the client takes (only the stall bound
// per write ends it). The drain timeout bounds only what comes after it
// (a background child still writing).
type drain struct {
	f *os.File
	// owed is set at the exit, less what has been read since; it drops to
	// nothing once a read finds the stream empty after the exit, for all
	// that was there at the exit has then been read.
	owed atomic.Int64
}

// ttyBufferSlack is what a pty may hold beyond what TIOCINQ counts: the
// line discipline's read buffer (4 KiB) is counted, the bytes the pty
// driver still holds for it (its flip buffer) are not. A pty in raw mode
// takes about 14 KiB in all before a writer blocks (measured on Linux
// 6.18; TestTTYBufferSlackCoversAPty pins it). Counted as owed at every
// exit: an over-count lets a background child's output past the drain
// timeout by at most this much, never for longer, since a read that finds
// the pty empty ends what is owed.
const ttyBufferSlack = 64 << 10

// ErrHangUp is the client ending its stream on a wire where that means it
// is gone (see halfCloseIsEOF), or a stream's way to say the client hung
// up (protocol v2's hang-up frame): the command is ended as client_gone
// while its output still reaches the client.
var ErrHangUp = errors.New("the client closed its stream (hang-up)")

// ErrEndOfInput is a stream's way to say the client's input is over while
// the stream goes on (protocol v2's EOF frame): the process's input ends
// (a pipe closed, a pty's EOF) and the stream is read on.
var ErrEndOfInput = errors.New("the client ended its input")

// Ending is what Config.Ending is told of the session's end.
type Ending struct {
	Reason     Reason
	Notice     string // for a reason other than exited, the words the Heroku wire's notice line has
	Code       int
	Signal     syscall.Signal
	CoreDumped bool
}

func (s *session) touch() { s.lastActive.Store(int64(time.Since(s.start))) }

// Run pumps bytes between s and p until the session ends, then tears it
// down. The teardown order, pinned by TestTeardownOrder:
//
//  1. the process exits, or is signalled (HUP, TERM after TermDelay, KILL
//     after KillGrace) when the session ends for another reason;
//  2. its remaining output is copied until EOF/EIO, or DrainQuiet with
//     nothing new, or DrainTimeout in all;
//  3. if the stream still works: the one-line notice for a reason other
//     than exited, then the exit marker line (if asked), then close_notify,
//     then up to Linger waiting for the client's own end;
//  4. the stream is closed; what is left of the process group gets SIGHUP
//     and, if still there after KillGrace, SIGKILL; our pty or pipe ends
//     are closed; both goroutines are joined.
//
// Run never returns before both pump goroutines have ended.
func Run(ctx context.Context, st Stream, p *Process, cfg Config) Result {
	cfg = cfg.withDefaults()
	s := &session{s: st, p: p, cfg: cfg, start: time.Now()}
	s.out.f, s.errOut.f = p.master, p.stderr
	s.touch()

	inDone := make(chan error, 1)
	outDone := make(chan error, 1)
	go func() {
		defer func() {
			if err := Recovered("stream -> process", recover()); err != nil {
				inDone <- err
			}
		}()
		inDone <- s.input()
	}()
	go func() {
		defer func() {
			if err := Recovered("process -> stream", recover()); err != nil {
				outDone <- err
			}
		}()
		outDone <- s.output()
	}()
	var ps pumpState
	ps.stderr = outputOver
	errDone := make(chan error, 1)
	if p.stderr != nil && cfg.Stderr != nil {
		ps.stderr = outputFlowing
		go func() {
			defer func() {
				if err := Recovered("stderr -> stream", recover()); err != nil {
					errDone <- err
				}
			}()
			errDone <- s.copyStderr()
		}()
	}

	var (
		reason     Reason
		detail     error
		streamDead bool
		killStop   = make(chan struct{})
		killing    bool
		killed     = make(chan struct{})
	)
	step := func(name string) {
		if cfg.Trace != nil {
			cfg.Trace(name)
		}
	}
	end := func(r Reason, err error) {
		if reason != "" {
			return
		}
		reason, detail = r, err
		// A hang-up leaves the stream up: the command's output while it
		// ends still reaches the client, which waits for our close.
		if (r == ReasonClientGone || r == ReasonStalled) && !errors.Is(err, ErrHangUp) {
			streamDead = true
			_ = st.Close() // unblocks both directions at once
		}
		if !killing {
			killing = true
			go func() {
				defer close(killed)
				defer func() { _ = recover() }() // a signal not sent is caught by reapGroup and the cgroup
				s.terminate(killStop)
			}()
		}
		step("ending: " + string(r))
	}
	// The end of an output copy (stdout, or stderr of its own, which goes
	// to the same stream): its failure ends the session.
	outputEnded := func(err error) {
		var we *streamWriteError
		var pe *PanicError
		switch {
		case errors.As(err, &pe):
			end(ReasonAgentError, err)
		case errors.As(err, &we) && isTimeout(we.err):
			end(ReasonStalled, fmt.Errorf("output blocked for %v: %w", cfg.StallTimeout, we.err))
		case errors.As(err, &we):
			end(ReasonClientGone, err)
		}
	}
	idle := newTimer(cfg.IdleTimeout)
	defer idle.Stop()
	maxT := newTimer(cfg.MaxDuration)
	defer maxT.Stop()
	for !ps.pumpOver() {
		// A direction or process that is over is no longer waited on.
		procDone, inC := p.Done(), inDone
		if ps.process == processExited {
			procDone = nil
		}
		if ps.input == inputOver {
			inC = nil
		}
		select {
		case <-procDone:
			ps.process = processExited
			step("exited")
			// TIOCINQ is FIONREAD: exact for a pipe; a pty can hold more.
			owed := int64(queued(p.master, unix.TIOCINQ))
			if p.tty {
				owed += ttyBufferSlack
			}
			s.out.owed.Store(owed)
			if p.stderr != nil {
				s.errOut.owed.Store(int64(queued(p.stderr, unix.TIOCINQ)))
			}
			s.exitedAt.Store(int64(time.Since(s.start)))
			s.exited.Store(true)
			// Bound the drain: a background child can hold the pty open.
			_ = p.master.SetReadDeadline(time.Now().Add(cfg.DrainQuiet))
			if p.stderr != nil {
				_ = p.stderr.SetReadDeadline(time.Now().Add(cfg.DrainQuiet))
			}
		case err := <-outDone:
			ps.output = outputOver
			step("output over")
			outputEnded(err)
		case err := <-errDone:
			ps.stderr = outputOver
			step("stderr over")
			outputEnded(err)
		case err := <-inC:
			ps.input = inputOver
			step("input over")
			var pe *PanicError
			switch {
			case errors.As(err, &pe):
				end(ReasonAgentError, err)
			case err != nil && reason == "":
				end(ReasonClientGone, err)
			}
		case <-idle.C():
			if d := s.idleFor(); d < cfg.IdleTimeout {
				idle.Reset(cfg.IdleTimeout - d)
				continue
			}
			end(ReasonIdle, fmt.Errorf("no activity for %v", cfg.IdleTimeout))
		case <-maxT.C():
			end(ReasonMaxDuration, fmt.Errorf("session reached its %v limit", cfg.MaxDuration))
		case <-ctx.Done():
			r := ReasonKilled
			if errors.Is(context.Cause(ctx), ErrShutdown) {
				r = ReasonShutdown
			}
			end(r, context.Cause(ctx))
			ctx = context.Background() // fire once
		}
	}
	close(killStop)
	if killing {
		<-killed
	}
	if reason == "" {
		reason = ReasonExited
	}
	code, sig := p.ExitStatus()
	step("drained")

	if !streamDead {
		_ = st.SetWriteDeadline(time.Now().Add(cfg.StallTimeout))
		var werr error
		switch {
		case cfg.Ending != nil:
			step("ending")
			e := Ending{Reason: reason, Code: code, Signal: sig, CoreDumped: p.CoreDumped()}
			if reason != ReasonExited {
				e.Notice = notice(reason, cfg)
			}
			werr = cfg.Ending(e)
		default:
			if reason != ReasonExited {
				step("notice")
				_, werr = io.WriteString(st, "\r\nattach-agent: session ended: "+notice(reason, cfg)+"\r\n")
			}
			if werr == nil && cfg.ExitMarker != nil {
				step("marker")
				_, werr = io.WriteString(st, cfg.ExitMarker(code))
			}
		}
		if werr == nil {
			step("close_notify")
			werr = st.CloseWrite()
		}
		if werr == nil && ps.input == inputOpen {
			// Bound both things the input goroutine may block on.
			step("linger")
			_ = st.SetReadDeadline(time.Now().Add(cfg.Linger))
			_ = p.input.SetWriteDeadline(time.Now().Add(cfg.Linger))
			<-inDone
			ps.input = inputOver
		}
	}
	step("closed")
	_ = st.Close()
	s.reapGroup()
	_ = p.Close()
	if ps.input == inputOpen {
		<-inDone
	}
	step("reaped")
	res := Result{
		Reason: reason, ExitCode: code, Signal: sig, Err: detail,
		BytesIn: s.bytesIn.Load(), BytesOut: s.bytesOut.Load(), EmptyReads: s.empty.Load(),
	}
	if f := s.firstOut.Load(); f > 0 {
		res.FirstOutput = time.Duration(f)
	}
	return res
}

func notice(r Reason, cfg Config) string {
	switch r {
	case ReasonIdle:
		return fmt.Sprintf("idle for %v", cfg.IdleTimeout)
	case ReasonMaxDuration:
		return fmt.Sprintf("reached the %v session limit", cfg.MaxDuration)
	case ReasonKilled:
		return "ended by the operator"
	case ReasonShutdown:
		return "the agent is shutting down"
	case ReasonAgentError:
		if cfg.Name != "" {
			return "internal error in the agent (session " + cfg.Name + "): its operator has the details"
		}
		return "internal error in the agent: its operator has the details"
	}
	return string(r)
}

// idleFor is how long nothing has moved, counting bytes still queued in
// the kernel (unsent on the socket, unread from the process) as movement.
func (s *session) idleFor() time.Duration {
	if s.cfg.Unsent != nil && s.cfg.Unsent() > 0 {
		s.touch()
	}
	if queued(s.p.master, unix.TIOCINQ) > 0 {
		s.touch()
	}
	return time.Since(s.start) - time.Duration(s.lastActive.Load())
}

// terminate signals the process group until the main process is gone:
// SIGHUP (the terminal hung up), SIGTERM after TermDelay, SIGKILL after
// KillGrace more. It stops early when stop is closed or the process exits.
func (s *session) terminate(stop <-chan struct{}) {
	steps := []struct {
		sig   syscall.Signal
		after time.Duration
	}{{syscall.SIGHUP, 0}, {syscall.SIGTERM, s.cfg.TermDelay}, {syscall.SIGKILL, s.cfg.KillGrace}}
	for _, st := range steps {
		if st.after > 0 {
			t := time.NewTimer(st.after)
			select {
			case <-t.C:
			case <-s.p.Done():
				t.Stop()
				return
			case <-stop:
				t.Stop()
				return
			}
		}
		_ = s.p.Signal(st.sig)
		if st.sig == syscall.SIGHUP {
			_ = s.p.Signal(syscall.SIGCONT) // a stopped process must wake to die
		}
	}
}

// reapGroup ends what is left of the process group after the main process
// (background children holding the pty): SIGHUP, then SIGKILL if any is
// still there after KillGrace. Polled, with a bound: there is no event for
// "every member of a group is gone".
func (s *session) reapGroup() {
	if !s.p.GroupAlive() {
		return
	}
	_ = s.p.Signal(syscall.SIGHUP)
	_ = s.p.Signal(syscall.SIGCONT)
	deadline := time.Now().Add(s.cfg.KillGrace)
	for s.p.GroupAlive() {
		if time.Now().After(deadline) {
			_ = s.p.Signal(syscall.SIGKILL)
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// pumpState is where a session's pump is: each part only moves forward,
// and the pump is over once the output is over and the process has
// exited; then the teardown runs (see Run). The phases a reader sees:
// running (all open), input over (the client's end given to the process;
// output goes on), exited and draining (the process gone, its output
// still copied, bounded as the drain says), ending (a reason recorded:
// the process is being signalled while output still flows, unless the
// stream is dead).
type pumpState struct {
	input   inputState
	output  outputState
	stderr  outputState // over from the start when stderr is not apart
	process processState
}

type (
	inputState   uint8
	outputState  uint8
	processState uint8
)

const (
	inputOpen inputState = iota
	inputOver
)

const (
	outputFlowing outputState = iota
	outputOver
)

const (
	processRunning processState = iota
	processExited
)

func (ps pumpState) pumpOver() bool {
	return ps.output == outputOver && ps.stderr == outputOver && ps.process == processExited
}

// streamWriteError marks a failure to write to the stream (as opposed to
// reading from the process).
type streamWriteError struct{ err error }

func (e *streamWriteError) Error() string { return "pty -> stream: " + e.err.Error() }
func (e *streamWriteError) Unwrap() error { return e.err }

// output copies the process's output to the stream until EOF (EIO), the
// drain bound after exit, or an error.
func (s *session) output() error {
	c := outputCopy{d: &s.out, w: s.s, name: "pty -> stream", fault: "output", first: true}
	if s.p.tty {
		c.gather = gatherWait
	}
	return s.copyOutput(c)
}

// copyStderr copies the process's own stderr (Spec.SeparateStderr) to
// cfg.Stderr until its end, or the drain bound after the exit.
func (s *session) copyStderr() error {
	return s.copyOutput(outputCopy{d: &s.errOut, w: s.cfg.Stderr, name: "stderr -> stream"})
}

// outputCopy is one of the process's output streams on its way out.
type outputCopy struct {
	d      *drain
	w      io.Writer // the stream, or what takes stderr apart
	name   string    // for its errors
	gather time.Duration
	fault  string // Config.Fault's point after each read, if any
	first  bool   // its first byte is the session's first output
}

// copyOutput copies c.d's stream to c.w until EOF, the drain bound after
// the exit, or an error. Every write is under the stall bound.
func (s *session) copyOutput(c outputCopy) error {
	buf := make([]byte, BufSize)
	rc, err := c.d.f.SyscallConn()
	if err != nil {
		return fmt.Errorf("%s: %w", c.name, err)
	}
	r := &outputReader{rc: rc, gather: c.gather}
	empty := 0
	for {
		// Whether the exit came before this read: only then were its bytes
		// in the queue the exit counted as owed. A read that returns just
		// before the exit's count and is looked at just after would else be
		// taken off what is owed too, and as many bytes still queued would
		// be cut by the drain bound (CI saw exactly 32 KiB lost so, under
		// load). A read the exit overtakes is not taken off: owed errs long.
		exitedBefore := s.exited.Load()
		n, err := r.read(buf[:len(buf)-s.cfg.WriteOverhead])
		if s.cfg.Fault != nil && c.fault != "" {
			s.cfg.Fault(c.fault)
		}
		if n > 0 {
			empty = 0
			s.touch()
			c.d.took(n, exitedBefore, r.foundEmpty)
			if s.exited.Load() {
				s.extendDrain(c.d)
			}
			// The stall bound is per write: a write that makes no
			// progress for StallTimeout fails with a deadline error.
			_ = s.s.SetWriteDeadline(time.Now().Add(s.cfg.StallTimeout))
			w, werr := c.w.Write(buf[:n])
			s.bytesOut.Add(int64(w))
			if c.first && s.firstOut.Load() == 0 && w > 0 {
				s.firstOut.Store(int64(max(time.Since(s.start), 1)))
				if s.cfg.FirstOutput != nil {
					s.cfg.FirstOutput()
				}
			}
			if werr != nil {
				return &streamWriteError{werr}
			}
			s.touch()
		}
		switch {
		case err == nil && n == 0:
			s.empty.Add(1)
			if empty++; empty > maxEmptyReads {
				return fmt.Errorf("%s: no progress: repeated empty reads", c.name)
			}
		case err == nil:
		case errors.Is(err, io.EOF), isClosed(err):
			return nil
		case isTimeout(err) && s.exited.Load():
			c.d.took(0, exitedBefore, r.foundEmpty)
			if s.readOn(c.d) {
				continue
			}
			return nil // quiet, or the drain bound is reached with nothing owed
		default:
			return fmt.Errorf("%s: read: %w", c.name, err)
		}
	}
}

// took counts n bytes read from d: off what is owed if the exit came
// before the read began; and if the read found d empty after the exit,
// nothing is owed any more (what the exit left has all been read).
func (d *drain) took(n int, exitedBefore, foundEmpty bool) {
	switch {
	case !exitedBefore:
	case foundEmpty:
		d.owed.Store(0)
	default:
		d.owed.Add(-int64(n))
	}
}

// readOn reports, when a read of d met its deadline after the exit,
// whether to read d on: while output written before the exit is owed
// (we were slow to come back from a write), or more is queued within the
// drain bound; the deadline is moved on then.
func (s *session) readOn(d *drain) bool {
	return (d.owed.Load() > 0 || queued(d.f, unix.TIOCINQ) > 0) && s.extendDrain(d)
}

// extendDrain moves d's read deadline to DrainQuiet from now; past
// DrainTimeout after the exit only while output written before the exit
// is still owed on d. It reports false once d's drain is over.
func (s *session) extendDrain(d *drain) bool {
	now := time.Now()
	next := now.Add(s.cfg.DrainQuiet)
	if d.owed.Load() <= 0 {
		limit := s.start.Add(time.Duration(s.exitedAt.Load()) + s.cfg.DrainTimeout)
		if !now.Before(limit) {
			_ = d.f.SetReadDeadline(limit)
			return false
		}
		next = earliest(next, limit)
	}
	_ = d.f.SetReadDeadline(next)
	return true
}

func earliest(a, b time.Time) time.Time {
	if a.Before(b) {
		return a
	}
	return b
}

// input copies the client's bytes to the process. At the end of the
// client's stream (or 0x04 in pipes mode with EOFByte) it gives the
// process EOF and, after that, discards what still comes so that the
// client's own end is seen. It returns nil at the stream's orderly end and
// the error otherwise.
func (s *session) input() error {
	buf := make([]byte, BufSize)
	inputOpen := true
	last := -1
	empty := 0
	closeInput := func() {
		if inputOpen {
			inputOpen = false
			_ = s.p.CloseInput(last, s.cfg.DrainTimeout) // best effort: the process may be gone
		}
	}
	for {
		n, err := s.s.Read(buf)
		if s.cfg.Fault != nil {
			s.cfg.Fault("input")
		}
		if n > 0 {
			empty = 0
			s.touch()
			s.bytesIn.Add(int64(n))
			data := buf[:n]
			eof := false
			if s.cfg.EOFByte && !s.p.tty {
				if i := bytes.IndexByte(data, 0x04); i >= 0 {
					data, eof = data[:i], true
				}
			}
			if inputOpen && len(data) > 0 {
				if _, werr := s.p.input.Write(data); werr != nil {
					// The process stopped reading for good (exited, closed
					// stdin): keep reading the stream for the client's end.
					inputOpen = false
				} else {
					last = int(data[len(data)-1])
					s.touch()
				}
			}
			if eof {
				closeInput()
			}
		}
		switch {
		case err == nil && n == 0:
			s.empty.Add(1)
			if empty++; empty > maxEmptyReads {
				return errors.New("stream -> pty: no progress: repeated empty reads")
			}
		case err == nil:
		case errors.Is(err, ErrEndOfInput):
			closeInput() // and read on: the client's hang-up or end is still to come
		case errors.Is(err, ErrHangUp):
			return ErrHangUp
		case errors.Is(err, io.EOF) && !s.halfCloseIsEOF():
			// What it sent before is the process's already; its end is
			// a hang-up (the Heroku CLI's Ctrl-C), not end of input.
			return ErrHangUp
		case errors.Is(err, io.EOF):
			closeInput()
			return nil
		case isTimeout(err), isClosed(err):
			return nil // linger over, or we closed the stream: not the client's doing
		default:
			return fmt.Errorf("stream -> pty: %w", err)
		}
	}
}

// halfCloseIsEOF: a session with no in-band end of input (binary pipes,
// a raw pty) takes the client's half-close as its end of input, since both
// ends agreed to that mode. Everywhere else the client's end of stream
// means the client is gone: the Heroku CLI ends input in band (0x04) and
// closes only when its user gives up (PROTOCOL.md).
func (s *session) halfCloseIsEOF() bool {
	if s.p.tty {
		return s.p.raw
	}
	return !s.cfg.EOFByte
}

func isClosed(err error) bool { return errors.Is(err, net.ErrClosed) || errors.Is(err, os.ErrClosed) }

// timer is a time.Timer that may be off (a negative duration).
type timer struct{ t *time.Timer }

func newTimer(d time.Duration) timer {
	if d < 0 {
		return timer{}
	}
	return timer{time.NewTimer(d)}
}

func (t timer) C() <-chan time.Time {
	if t.t == nil {
		return nil
	}
	return t.t.C
}

func (t timer) Reset(d time.Duration) {
	if t.t != nil {
		t.t.Reset(d)
	}
}

func (t timer) Stop() {
	if t.t != nil {
		t.t.Stop()
	}
}
