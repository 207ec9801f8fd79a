package daemon

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"runtime/debug"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/attach-agent/attach-agent/agent"
	"github.com/attach-agent/attach-agent/container"
	"github.com/attach-agent/attach-agent/ptyio"
	"github.com/attach-agent/attach-agent/tlsdial"
)

// startHeap, startBound and settleDelay bound a worker's start without
// collection (see runWorker).
const (
	startHeap   = 64 << 20
	startBound  = 2 * time.Second
	settleDelay = 250 * time.Millisecond
)

// workerArg is the argument a worker is started with (the agent's binary
// re-executed, as the sandbox init is).
const workerArg = "__session-worker"

// Main runs this process as a session's worker when the daemon started it
// as one, and never returns then. Call it first in main (and in TestMain
// of tests that start daemons), after container.Main.
func Main() {
	if len(os.Args) == 2 && os.Args[1] == workerArg {
		os.Exit(runWorker())
	}
}

// A worker owns one session for its whole life: the relay connection (a
// TLS state no other process can take over), the pty or pipes, the command
// and its groups. It writes the session's record, runs agent.Run, writes
// the result and exits. Losing its daemon changes nothing: every bound is
// the session's own, kept here. fd 3 is the socket pair to the daemon that
// started it.
func runWorker() int {
	// No collection while the session starts (a fresh process's heap is
	// small, so the first few MiB would trigger cycles on the path to the
	// first byte); once it runs, the default again, and what the start
	// used goes back to the system (an idle session holds little).
	// A memory limit bounds the heap meanwhile (the collector runs at it),
	// and the start ends settleDelay after the first output byte, or at
	// the latest startBound after the order. A session over by then (a
	// CI step's short command) never pays for the collection: the exit
	// frees it all.
	gcPercent := debug.SetGCPercent(-1)
	memLimit := debug.SetMemoryLimit(startHeap)
	settle := sync.OnceFunc(func() {
		debug.SetGCPercent(gcPercent)
		debug.SetMemoryLimit(memLimit)
		debug.FreeOSMemory()
	})
	// The command must not hold the daemon's end of things, nor anything
	// else this process was started with past stderr (fds the daemon
	// inherited, such as systemd's sockets).
	unix.CloseOnExec(3)
	_ = unix.CloseRange(4, ^uint(0), unix.CLOSE_RANGE_CLOEXEC)
	f := os.NewFile(3, "daemon")
	fc, err := net.FileConn(f)
	_ = f.Close()
	if err != nil {
		fmt.Fprintln(os.Stderr, "attach-agent worker: fd 3 is not the daemon's socket:", err)
		return 2
	}
	daemonLink := newLink(fc.(*net.UnixConn))
	ctx, cancel := context.WithCancelCause(context.Background())
	defer cancel(nil)
	// Signals that end the daemon or its terminal are not this session's
	// business: a worker is in a session of its own (setsid) and handles
	// SIGHUP and SIGINT by ignoring them (handled, not SIG_IGN, so that the
	// command starts with them at their defaults). SIGPIPE on a log write
	// to a gone stderr is an error, not a death. SIGTERM is what a system
	// shutdown sends every process: the session ends as shutdown.
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGHUP, syscall.SIGINT, syscall.SIGPIPE, syscall.SIGTERM)
	go func() {
		for s := range sigs {
			if s == syscall.SIGTERM {
				cancel(ptyio.ErrShutdown)
			}
		}
	}()

	m, err := daemonLink.recv()
	if err != nil || m.Type != "setup" || m.Config == nil {
		return 0 // the daemon went away before it set us up: nothing to do
	}
	cfg, key := *m.Config, m.Key
	log, err := NewLogger(cfg.LogFormat, os.Stderr, nil)
	if err != nil {
		log = slog.New(slog.NewTextHandler(os.Stderr, nil))
	}
	var tlsErr error
	dial := cfg.Dial
	if !dial.Plain {
		dial.TLS, tlsErr = tlsdial.LoadTLS(cfg.CA, cfg.Cert, cfg.Key)
	}

	if m.Warm && tlsErr == nil {
		warmUp(cfg, key, dial)
	}
	nice := m.Nice
	if nice != nil {
		if err := reniceSelf(*nice); err != nil {
			// Its command would run at a spare's priority: no session here.
			fmt.Fprintln(os.Stderr, "attach-agent worker: taking the daemon's priority back:", err)
			return 1
		}
	}
	// After the warm-up, whose miniature relay's session is not one to
	// keep. The sessions the daemon gave are read now, while nothing
	// waits (parsing one, its relay's chain in it, takes 50-100 µs).
	tickets := &tlsdial.Tickets{Identity: tlsdial.IdentityOf(dial.TLS)}
	if dial.TLS != nil {
		dial.TLS.ClientSessionCache = tickets
		for relay, b := range m.Tickets {
			_ = tickets.Import(tlsdial.TicketKey(dial.TLS, tlsdial.URL{Host: relay}), b) // one that does not parse: a full handshake
		}
	}
	// The record's pid and start time, read before the order comes, and
	// its place, made now (record.go).
	self, selfErr := container.StartTime(os.Getpid())
	place := filepath.Join(cfg.sessionsDir(), m.Place)
	ln, placeErr := makePlace(place, m.Place) // ours to remove on every way out but the session's
	// A spare waits here, set up, until a session is ordered or its
	// daemon no longer needs it (EOF).
	// A wake comes while the daemon reads the request it will hand us:
	// we are running again by the time the order comes.
	m, err = daemonLink.recv()
	for err == nil && m.Type == "wake" {
		m, err = daemonLink.recv()
	}
	refuse := func(why string) int {
		dropPlace(ln, place)
		_ = daemonLink.send(message{Type: "refused", Error: why})
		return 1
	}
	if err != nil || m.Type != "order" || m.Order == nil {
		dropPlace(ln, place)
		return 0
	}
	o, ticket := *m.Order, m.Ticket
	time.AfterFunc(startBound, settle)
	w := &worker{cfg: cfg, log: log.With("session_id", o.ID), id: o.ID, cancel: cancel, dir: filepath.Join(cfg.sessionsDir(), o.ID), settle: settle, key: key, tickets: tickets, parent: daemonLink, nice: nice}
	if selfErr != nil {
		return refuse("the worker's own start time: " + selfErr.Error())
	}
	w.start = self
	spec, err := w.prepare(o, dial, tlsErr)
	if err != nil {
		return refuse(err.Error())
	}
	if len(ticket) > 0 {
		_ = tickets.Import(w.ticketKey, ticket) // one that does not parse: a full handshake
	}
	// The record first, then the session: worker.json into the place,
	// which then becomes the record, whole. Writing the record (about
	// 0.15 ms on the state directory's tmpfs, when it was made here)
	// while the session dials was measured to slow the dial more than it
	// saves: the record's syscalls and the daemon's answer to the API
	// take the CPU that the TCP connect and the TLS handshake need
	// (docs/BENCHMARKS.md, issue 12).
	if placeErr != nil {
		return refuse("the session's record: " + placeErr.Error())
	}
	if err := writeFile(place, workerFile, w.rec); err != nil {
		return refuse("writing the session's record: " + err.Error())
	}
	if err := publish(place, w.dir); err != nil {
		return refuse("the session's record: " + err.Error()) // what is at w.dir is not ours
	}
	if err := w.join(daemonLink, message{Type: "accepted", Record: &w.rec}); err != nil {
		// The daemon is gone already: the session is ours alone, and the
		// next daemon finds its record.
		w.log.Warn("worker: the daemon went away while the session started", "err", err.Error())
	}
	ended := make(chan agent.Result, 1)
	go func() { ended <- agent.Run(ctx, spec, w.log) }()
	go w.serve(daemonLink)
	go w.accept(ln)

	res := <-ended
	r := resultOf(res, time.Now())
	if err := writeFile(w.dir, resultFile, r); err != nil {
		w.log.Error("worker: writing the session's result", "err", err.Error())
	}
	_ = ln.Close()
	w.broadcast(message{Type: "ended", Result: &r})
	return 0
}

type worker struct {
	cfg    Config
	log    *slog.Logger
	id     string
	dir    string
	rec    record
	cancel context.CancelCauseFunc
	settle func() // the collector back on, once the session runs
	key    []byte // the host's key for secretHash
	start  string // this process's start time (container.StartTime)

	tickets   *tlsdial.Tickets // the session's dial's TLS session cache
	ticketKey string           // its relay's name there
	parent    *link            // the daemon that started us (its socket pair)
	nice      *int             // the daemon's priority, when this spare started nicer (nice.go)

	mu    sync.Mutex
	links []*link
}

// prepare reads the order as the daemon did and fills in the record,
// which runWorker then writes.
func (w *worker) prepare(o order, dial tlsdial.Config, tlsErr error) (agent.Spec, error) {
	if tlsErr != nil {
		return agent.Spec{}, fmt.Errorf("the relay's TLS settings: %w", tlsErr)
	}
	spec, err := specFor(w.cfg, o.Request)
	if err != nil {
		return spec, err
	}
	spec.Dial.TLS, spec.ID, spec.Caller, spec.DenyRoot = dial.TLS, o.ID, o.Caller, o.DenyRoot
	w.ticketKey = tlsdial.TicketKey(dial.TLS, spec.URL)
	if point := o.Request.Labels[w.cfg.FaultLabel]; w.cfg.FaultLabel != "" && point != "" {
		spec.Fault = func(p string) {
			if p == point {
				panic("injected fault at " + p)
			}
		}
	}
	w.rec = record{
		V: recordVersion, ID: o.ID, PID: os.Getpid(), Start: w.start, StartedAt: time.Now(), About: spec.About(),
		SecretHash: secretHash(w.key, spec.URL.Secret), Place: spec.Container.Place(),
	}
	if !spec.Container.IsZero() {
		ctr := spec.Container
		w.rec.Container = &ctr
	}
	// The daemon starts the next spare once this session runs, off the
	// path to its first byte.
	spec.Pump.FirstOutput = func() {
		go w.broadcastRunning()
		time.AfterFunc(settleDelay, w.settle)
	}
	crash := w.cfg.FaultLabel != "" && o.Request.Labels[w.cfg.FaultLabel] == "worker"
	spec.Started = func(pid int) {
		if w.nice != nil {
			if err := commandAt(pid, *w.nice); err != nil {
				w.log.Warn("worker: the command's priority", "err", err.Error())
			}
		}
		st, err := container.StartTime(pid)
		if err == nil {
			err = writeFile(w.dir, commandFile, process{pid, st})
		}
		if err != nil {
			w.log.Warn("worker: recording the command's pid", "err", err.Error())
		}
		if crash {
			go panic("injected crash of the worker") // not recovered: the whole process goes
		}
	}
	return spec, nil
}

// makePlace makes dir, the record's place named name (record.go), with
// the control socket daemons that adopt us connect to. On an error it
// leaves nothing of what it made.
func makePlace(dir, name string) (*net.UnixListener, error) {
	if !validPlace(name) {
		return nil, fmt.Errorf("the daemon named no place for it (%q)", name)
	}
	if err := os.Mkdir(dir, 0o700); err != nil {
		return nil, err // not ours to remove
	}
	path := filepath.Join(dir, controlFile)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err == nil {
		ln.SetUnlinkOnClose(false) // the record goes with the daemon that reports the end
		if err = os.Chmod(path, 0o600); err != nil {
			_ = ln.Close()
		}
	}
	if err != nil {
		_ = os.RemoveAll(dir)
		return nil, fmt.Errorf("the session's control socket: %w", err)
	}
	return ln, nil
}

// dropPlace closes ln and removes its place, dir, when makePlace made
// them (ln is nil when it did not: nothing there is ours).
func dropPlace(ln *net.UnixListener, dir string) {
	if ln == nil {
		return
	}
	_ = ln.Close()
	_ = os.RemoveAll(dir)
}

// accept serves each daemon that connects: only our own uid (the
// directory is 0700 too).
func (w *worker) accept(ln *net.UnixListener) {
	for {
		c, err := ln.AcceptUnix()
		if err != nil {
			return
		}
		if !peerIs(c, os.Geteuid()) {
			_ = c.Close()
			continue
		}
		l := newLink(c)
		if err := w.join(l, message{Type: "hello", Record: &w.rec}); err != nil {
			l.close()
			continue
		}
		go w.serve(l)
	}
}

// serve takes a daemon's requests until it goes; its going ends nothing.
func (w *worker) serve(l *link) {
	defer w.drop(l)
	for {
		m, err := l.recv()
		if err != nil {
			return
		}
		if m.Type != "end" {
			continue
		}
		switch m.Cause {
		case causeShutdown:
			w.cancel(ptyio.ErrShutdown)
		default:
			w.cancel(errors.New("deleted through the control API"))
		}
	}
}

// join sends a daemon's link its first message (accepted, hello) and adds
// it to those broadcasts go to, under the lock, so that no broadcast
// (running, ended) overtakes the first message.
func (w *worker) join(l *link, first message) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if err := l.send(first); err != nil {
		return err
	}
	w.links = append(w.links, l)
	return nil
}

func (w *worker) drop(l *link) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for i, o := range w.links {
		if o == l {
			w.links = append(w.links[:i], w.links[i+1:]...)
			break
		}
	}
	l.close()
}

// broadcastRunning tells the daemons the session runs, with the relay's
// TLS session for the next worker's dial (it came with the handshake and
// was read before the ack).
func (w *worker) broadcastRunning() {
	ticket, _ := w.tickets.Export(w.ticketKey)
	for _, l := range w.linksNow() {
		m := message{Type: "running"}
		if l == w.parent {
			m.Ticket = ticket // to the daemon that started us only: the one that keeps it
		}
		_ = l.send(m)
	}
}

func (w *worker) broadcast(m message) {
	for _, l := range w.linksNow() {
		_ = l.send(m) // best effort: result.json is what counts
		l.close()
	}
}

// linksNow is the daemons connected now, to send to outside the lock.
func (w *worker) linksNow() []*link {
	w.mu.Lock()
	defer w.mu.Unlock()
	return append([]*link(nil), w.links...)
}

// secretHash is what records keep of a secret: enough to refuse a second
// session with it, nothing to pair with, and nothing to test guesses
// against without the host's key (an HMAC, not a bare hash).
func secretHash(key []byte, secret string) string {
	m := hmac.New(sha256.New, key)
	m.Write([]byte(secret))
	return hex.EncodeToString(m.Sum(nil))
}
