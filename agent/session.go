// Package agent runs attach sessions: dial the relay, wait for the pair,
// start the process (only then), pump, drain, and report one result with
// one reason. It wires tlsdial (the stream) to ptyio (the process and the
// pump) and says how it ended, with one reason; the daemon (package
// daemon) runs each session in a worker process of its own on top of it.
// It touches the relay connection, the process and its container, never
// HTTP, metrics or a state directory.
package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"syscall"
	"time"

	"github.com/attach-agent/attach-agent/container"
	"github.com/attach-agent/attach-agent/ptyio"
	"github.com/attach-agent/attach-agent/tlsdial"
	"github.com/attach-agent/attach-agent/wire"
)

// Reasons that end a session before a process exists; the rest come from
// ptyio. Together they are the closed set a session's end is one of.
const (
	ReasonPairTimeout ptyio.Reason = "pair_timeout"
	ReasonDialFailed  ptyio.Reason = "dial_failed"
	ReasonSpawnFailed ptyio.Reason = "spawn_failed"
)

// Reasons lists every end reason, for metrics created up front.
var Reasons = []ptyio.Reason{
	ptyio.ReasonExited, ptyio.ReasonClientGone, ptyio.ReasonIdle, ptyio.ReasonMaxDuration,
	ptyio.ReasonStalled, ReasonPairTimeout, ReasonDialFailed, ReasonSpawnFailed,
	ptyio.ReasonKilled, ptyio.ReasonShutdown, ptyio.ReasonAgentError,
}

// ExitAgentError is the exit code for a session the agent could not run
// (dial, TLS, pairing, spawn): the shell-style code 125.
const ExitAgentError = 125

// Spec is one session to run.
type Spec struct {
	URL     tlsdial.URL
	Dial    tlsdial.Config
	Process ptyio.Spec
	// User runs the command as NAME, UID, NAME:GROUP or UID:GID, looked up
	// in the container's passwd and group files; empty: as the agent.
	User string
	// Container is where the command runs; the zero value: on the host.
	Container container.Spec
	Pump      ptyio.Config
	// ExitStatusMarker writes the Heroku CLI's exit-status line after all
	// output, so `heroku run -x` and our client exit with the status.
	ExitStatusMarker bool
	// Labels (app, dyno name) are carried into the log lines.
	Labels map[string]string
	// SetupTimeout bounds the steps where the tenant's image or container
	// could hold the session up (user lookup, sandbox and join setup, up
	// to the command's start); past it the session fails as spawn_failed.
	// Zero: container.DefaultSetupTimeout.
	SetupTimeout time.Duration
	// DenyRoot refuses to start the command as root (the operator's
	// policy): a user the container's files make uid 0 included.
	DenyRoot bool
	// Caller is who asked for the session (the control API's peer), for
	// the log line; nil: not through the API.
	Caller *Caller
	// ID names the session to its client in an internal error's notice.
	ID string
	// Keepalive and PeerTimeout bound a protocol v2 session's link (the
	// URL's #v2): a ping every Keepalive, and a client not heard for
	// PeerTimeout is gone (client_gone). Zero: DefaultKeepalive,
	// DefaultPeerTimeout; negative: off.
	Keepalive, PeerTimeout time.Duration
	// Started, when set, is called with the command's pid once it runs
	// (its process group has the same id), so that the caller can end
	// what is left if this process is killed.
	Started func(pid int)
	// Fault, for tests, is called at named points of the session
	// ("started", then the pump's "input" and "output"). Nil in
	// production.
	Fault func(point string)
}

// Timings break a session into phases.
type Timings struct {
	Connect, TLS, Dial, Pair, Spawn time.Duration
	// FirstOutput is from the start of the session to its first output
	// byte written to the stream.
	FirstOutput time.Duration
	Total       time.Duration
	Attempts    int
	TLSResumed  bool `json:",omitempty"` // the relay's TLS session was resumed
}

// Result is how a session ended. Err is never nil unless Reason is exited.
type Result struct {
	Reason   ptyio.Reason
	ExitCode int // the command's status, or 125 / 126 / 127 when it did not run
	Signal   syscall.Signal
	Started  bool // the process was started
	BytesIn  int64
	BytesOut int64
	Empty    int64 // reads without progress
	Timings  Timings
	SlowDial bool
	Err      error
}

// Run runs one session to its end. The context ends it early: cancel it
// with ptyio.ErrShutdown as the cause for reason shutdown, anything else
// for killed. log receives warnings (nil: none); the one line at the end
// is the caller's, with LogResult, once it knows the session is over.
//
// A panic in the session's own goroutines (the pump's, the setup's) ends
// this session alone, as agent_error, its process group killed and the
// stack logged; the client is told only that, with the session's ID.
func Run(ctx context.Context, spec Spec, log *slog.Logger) Result {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	t0 := time.Now()
	res := run(ctx, spec, log, t0)
	res.Timings.Total = time.Since(t0)
	var pe *ptyio.PanicError
	if errors.As(res.Err, &pe) {
		log.Error("session panic", "secret_fp", spec.URL.Fingerprint(), "where", pe.Where, "panic", fmt.Sprint(pe.Value), "stack", string(pe.Stack))
	}
	return res
}

func run(ctx context.Context, spec Spec, log *slog.Logger, t0 time.Time) (res Result) {
	var proc *ptyio.Process
	var conn *tlsdial.Conn
	defer func() {
		// Last of all (the setup's release has run): the stream closes
		// here, after an internal error is told on it.
		if conn != nil {
			defer func() { _ = conn.Close() }() // best effort: ptyio closes it too
		}
		err := ptyio.Recovered("session", recover())
		if err == nil {
			return
		}
		if proc != nil {
			_ = proc.Signal(syscall.SIGKILL) // the group; the cgroup's release ends what escaped it
		}
		if conn != nil {
			func() {
				defer func() { _ = recover() }() // a second fault must not take the daemon
				tellClient(conn, ptyio.ReasonAgentError, internalError(spec), spec, ExitAgentError)
			}()
		}
		res.Reason, res.Err, res.ExitCode = ptyio.ReasonAgentError, err, ExitAgentError
	}()
	ctxReason := func() ptyio.Reason {
		if errors.Is(context.Cause(ctx), ptyio.ErrShutdown) {
			return ptyio.ReasonShutdown
		}
		return ptyio.ReasonKilled
	}
	fail := func(r ptyio.Reason, err error) Result {
		if ctx.Err() != nil {
			r = ctxReason()
		}
		res.Reason, res.Err, res.ExitCode = r, err, ExitAgentError
		return res
	}

	// Where and as whom the command will run (the user lookup, the
	// session's cgroups) is settled, and its terminal opened, while the
	// dial is on the wire, off the path to the first byte. A failure is
	// told to the client once paired; nothing runs before that either way.
	ps := spec.Process
	if spec.URL.V2 {
		ps.SeparateStderr = !ps.TTY // stderr frames of their own
	}
	var release func() error
	var applyErr error
	applied := make(chan struct{})
	setup := spec.SetupTimeout
	if setup <= 0 {
		setup = container.DefaultSetupTimeout
	}
	go func() {
		defer close(applied)
		defer func() {
			if err := ptyio.Recovered("setup", recover()); err != nil {
				applyErr = err
			}
		}()
		release, applyErr = container.Apply(ctx, spec.Container, spec.User, &ps, setup)
		if applyErr == nil && ps.TTY {
			ps.Terminal, applyErr = ptyio.OpenTerminal(ps)
		}
	}()
	startCalled := false
	defer func() {
		<-applied
		if ps.Terminal != nil && !startCalled {
			ps.Terminal.Close() // nobody paired: Start never took it over
		}
		// After the process and its sandbox are gone: whatever is left
		// in the session's cgroups is killed at once.
		if release == nil { // the setup panicked
			return
		}
		if err := release(); err != nil {
			log.Warn("session cleanup", "secret_fp", spec.URL.Fingerprint(), "err", err.Error())
		}
	}()

	conn, err := tlsdial.Dial(ctx, spec.URL, spec.Dial)
	if err != nil {
		var de *tlsdial.DialError
		if errors.As(err, &de) {
			res.Timings.Attempts = de.Attempts
		}
		return fail(ReasonDialFailed, err)
	}
	res.Timings.Connect, res.Timings.TLS, res.Timings.Dial = conn.Timings.Connect, conn.Timings.TLS, conn.Timings.Dial
	res.Timings.Attempts, res.Timings.TLSResumed = conn.Timings.Attempts, conn.Timings.Resumed
	if conn.Slow() {
		res.SlowDial = true
		log.Warn("slow relay handshake", "secret_fp", spec.URL.Fingerprint(),
			"connect_ms", ms(conn.Timings.Connect), "tls_ms", ms(conn.Timings.TLS),
			"dial_ms", ms(conn.Timings.Dial), "attempts", conn.Timings.Attempts)
	}

	err = conn.Pair(ctx, spec.URL.Secret, spec.Dial.PairTimeout)
	res.Timings.Pair = conn.Timings.Pair
	if errors.Is(err, tlsdial.ErrPairTimeout) {
		return fail(ReasonPairTimeout, err)
	}
	if err != nil {
		return fail(ReasonDialFailed, err)
	}

	// Only now, with somebody attached, does the command run.
	ts := time.Now()
	select {
	case <-applied:
	case <-time.After(setup):
		// Apply reads only bounded, non-blocking files; this guards what
		// it cannot bound (a stat on a hung filesystem in the image).
		err := fmt.Errorf("setup took longer than its timeout (%v): the image or container held it up", setup)
		res = fail(ReasonSpawnFailed, err)
		tellClient(conn, res.Reason, err, spec, res.ExitCode)
		return res
	}
	if err = applyErr; err == nil && spec.DenyRoot {
		if c := ps.SysProcAttr; c == nil || c.Credential == nil || c.Credential.Uid == 0 || c.Credential.Gid == 0 {
			err = &PolicyError{"running the command as root (the container's files make " + orAgent(spec.User) + " uid or gid 0)", "--allow-root-user"}
		}
	}
	if err == nil {
		startCalled = true
		proc, err = ptyio.Start(ps)
	}
	res.Timings.Spawn = time.Since(ts)
	if err != nil {
		res = fail(ReasonSpawnFailed, err)
		var se *ptyio.SpawnError
		var pe *ptyio.PanicError
		switch {
		case errors.As(err, &se):
			res.ExitCode = se.Code
		case errors.As(err, &pe):
			res.Reason = ptyio.ReasonAgentError
			err = internalError(spec) // never the panic's text: it may name host paths
		}
		tellClient(conn, res.Reason, err, spec, res.ExitCode)
		return res
	}
	res.Started = true
	if spec.Started != nil {
		spec.Started(proc.Pid())
	}
	if spec.Fault != nil {
		spec.Fault("started")
	}

	pc := spec.Pump
	pc.Name = spec.ID
	if pc.Fault == nil {
		pc.Fault = spec.Fault
	}
	if spec.ExitStatusMarker {
		pc.ExitMarker = wire.ExitStatusLine
	}
	if pc.Unsent == nil {
		pc.Unsent = ptyio.SocketUnsent(conn.Raw.(syscall.Conn))
	}
	var st ptyio.Stream = conn
	if spec.URL.V2 {
		// Frames both ways: the end of input, the exit and the reason are
		// in band, so no byte is special (0x04 is data) and no marker.
		v2 := newV2Stream(conn, spec.Keepalive, spec.PeerTimeout)
		v2.resize = func(cols, rows uint16) { _ = proc.Resize(cols, rows) } // best effort: a gone pty ends the session anyway
		st, pc.Ending, pc.Stderr, pc.EOFByte, pc.ExitMarker = v2, v2.Ending, v2.Stderr(), false, nil
		pc.WriteOverhead = wire.HeaderLen
	}
	startPump := time.Since(t0)
	pr := ptyio.Run(ctx, st, proc, pc)
	res.Reason, res.ExitCode, res.Signal, res.Err = pr.Reason, pr.ExitCode, pr.Signal, pr.Err
	res.BytesIn, res.BytesOut, res.Empty = pr.BytesIn, pr.BytesOut, pr.EmptyReads
	if pr.FirstOutput > 0 {
		res.Timings.FirstOutput = startPump + pr.FirstOutput
	}
	return res
}

// tellClient sends a failure as one line starting "attach-agent:", the
// exit marker if asked, and ends the stream politely; under v2, as the
// end's frames.
func tellClient(conn *tlsdial.Conn, reason ptyio.Reason, err error, spec Spec, code int) {
	if spec.URL.V2 {
		tellClientV2(conn, reason, err, code)
		return
	}
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	msg := "attach-agent: " + err.Error() + "\r\n"
	if _, werr := io.WriteString(conn, msg); werr != nil {
		return
	}
	if spec.ExitStatusMarker {
		if _, werr := io.WriteString(conn, wire.ExitStatusLine(code)); werr != nil {
			return
		}
	}
	_ = conn.CloseWrite()
	// A short linger for the client's end, so it reads the line before a
	// close could reset the connection.
	_ = conn.SetReadDeadline(time.Now().Add(time.Second))
	_, _ = io.Copy(io.Discard, conn)
}

func ms(d time.Duration) int64 { return d.Milliseconds() }

func internalError(spec Spec) error {
	if spec.ID != "" {
		return fmt.Errorf("internal error in the agent (session %s): its operator has the details", spec.ID)
	}
	return errors.New("internal error in the agent: its operator has the details")
}

func orAgent(user string) string {
	if user == "" {
		return "the agent's user"
	}
	return user
}

// About is what a session's end line says of it besides the result: never
// the secret, only its fingerprint.
type About struct {
	SecretFP  string            `json:"secret_fp"`
	Relay     string            `json:"relay"`
	User      string            `json:"user,omitempty"`
	Container string            `json:"container,omitempty"`
	Caller    *Caller           `json:"caller,omitempty"`
	Labels    map[string]string `json:"labels,omitempty"`
}

// About describes the session for its end line.
func (s Spec) About() About {
	a := About{SecretFP: s.URL.Fingerprint(), Relay: s.URL.Addr(), User: s.User, Caller: s.Caller, Labels: s.Labels}
	if !s.Container.IsZero() {
		a.Container = s.Container.String()
	}
	return a
}

// LogResult writes the session's one end line ("session ended"): info
// for an exit, a warning for every other reason.
func LogResult(log *slog.Logger, a About, r Result) {
	attrs := []any{
		"secret_fp", a.SecretFP, "relay", a.Relay, "reason", string(r.Reason),
		"exit_code", r.ExitCode, "bytes_in", r.BytesIn, "bytes_out", r.BytesOut,
		"duration_ms", ms(r.Timings.Total), "dial_ms", ms(r.Timings.Dial), "tls_ms", ms(r.Timings.TLS),
		"pair_ms", ms(r.Timings.Pair), "spawn_ms", ms(r.Timings.Spawn), "first_output_ms", ms(r.Timings.FirstOutput),
	}
	if r.Signal != 0 {
		attrs = append(attrs, "signal", r.Signal.String())
	}
	if r.Timings.TLSResumed {
		attrs = append(attrs, "tls_resumed", true)
	}
	if a.User != "" {
		attrs = append(attrs, "user", a.User)
	}
	if a.Container != "" {
		attrs = append(attrs, "container", a.Container)
	}
	if a.Caller != nil {
		attrs = append(attrs, "caller_uid", a.Caller.UID, "caller_pid", a.Caller.PID)
	}
	if r.Err != nil {
		attrs = append(attrs, "err", r.Err.Error())
	}
	for k, v := range a.Labels {
		attrs = append(attrs, "label_"+k, v)
	}
	level := slog.LevelInfo
	if r.Reason != ptyio.ReasonExited {
		level = slog.LevelWarn
	}
	log.Log(context.Background(), level, "session ended", attrs...)
}

// Caller is who asked for a session through the daemon's control API: the
// peer credentials of its unix socket connection (SO_PEERCRED), as the
// kernel vouches for them.
type Caller struct {
	UID uint32 `json:"uid"`
	GID uint32 `json:"gid"`
	PID int32  `json:"pid"`
}

// PolicyError is a request the operator's policy refuses; Flag names the
// setting that would allow it.
type PolicyError struct{ What, Flag string }

func (e *PolicyError) Error() string {
	return fmt.Sprintf("refused by the operator's policy: %s (the daemon's %s allows it)", e.What, e.Flag)
}

// String is a one-line description for people.
func (r Result) String() string {
	s := fmt.Sprintf("reason=%s exit=%d in=%d out=%d", r.Reason, r.ExitCode, r.BytesIn, r.BytesOut)
	if r.Err != nil {
		s += " err=" + r.Err.Error()
	}
	return s
}
