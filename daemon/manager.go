package daemon

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/attach-agent/attach-agent/agent"
	"github.com/attach-agent/attach-agent/container"
	"github.com/attach-agent/attach-agent/ptyio"
	"github.com/attach-agent/attach-agent/tlsdial"
)

// View is what the API shows of a session. It never holds the secret.
type View struct {
	ID         string            `json:"id"`
	State      string            `json:"state"` // running, ended
	Reason     string            `json:"reason,omitempty"`
	ExitCode   *int              `json:"exit_code,omitempty"`
	Signal     string            `json:"signal,omitempty"`
	Error      string            `json:"error,omitempty"`
	BytesIn    int64             `json:"bytes_in"`
	BytesOut   int64             `json:"bytes_out"`
	Relay      string            `json:"relay"`
	SecretFP   string            `json:"secret_fp"`
	Labels     map[string]string `json:"labels,omitempty"`
	User       string            `json:"user,omitempty"`
	Container  *container.Spec   `json:"container,omitempty"`
	StartedAt  time.Time         `json:"started_at"`
	EndedAt    *time.Time        `json:"ended_at,omitempty"`
	TimingsMS  map[string]int64  `json:"timings_ms,omitempty"`
	Caller     *Caller           `json:"caller,omitempty"`
	DialTries  int               `json:"dial_attempts,omitempty"`
	CommandRan bool              `json:"command_ran"`
	WorkerPID  int               `json:"worker_pid,omitempty"` // the session's process (running sessions)
	Adopted    bool              `json:"adopted,omitempty"`    // started by an earlier daemon
}

// managed is one session as the daemon sees it: its worker, and in the
// end its result.
type managed struct {
	id      string
	rec     record
	adopted bool
	pidfd   *os.File      // the worker; nil once it is watched no more
	own     bool          // our child, to reap
	link    *link         // to the worker; nil: none now
	ready   chan struct{} // closed once its worker took it (or did not)
	done    chan struct{}
	ended   time.Time
	result  agent.Result
}

// Manager is the supervisor: it starts a worker process per session
// (from a few spares started ahead), lists, waits on, ends and reports
// them, and adopts at its start the workers an earlier daemon left.
type Manager struct {
	cfg     Config
	log     *slog.Logger
	metrics *Metrics
	self    string
	env     []string
	key     []byte // the host's key for secret hashes (record.go)
	nice    *int   // the daemon's priority, when spares start nicer (nice.go)

	mu       sync.Mutex
	sessions map[string]*managed
	running  int
	closing  bool // draining or handed over: no new sessions
	released bool // handed over: the workers are no longer ours to watch
	watchers sync.WaitGroup
	creating sync.WaitGroup // creates between reserving and their worker's answer

	spares    []*spare        // waiting, the next to be taken first (under mu)
	places    map[string]bool // the places of our spares' records, made or to be (under mu; record.go)
	spareStop chan struct{}
	spareDone chan struct{}
	taken     chan struct{}   // a spare was taken
	refill    chan struct{}   // a session that took one is running: start the next
	tickets   tlsdial.Carried // the newest TLS session a worker had per relay name, for the next
}

// spareDelay is the longest a taken spare's replacement waits for its
// session to run before it is started anyway.
const spareDelay = 500 * time.Millisecond

// Errors Create returns besides *RequestError and *PolicyError.
var (
	ErrFull         = errors.New("too many sessions running: retry later")
	ErrShuttingDown = errors.New("the agent is draining or handing over: not taking new sessions (a new daemon takes them within seconds of a restart)")
	ErrDuplicate    = errors.New("a running session already has this attach_url's secret: two would pair with each other; end it first, or use a new secret")
)

// NewManager makes the supervisor for cfg (Validate it first); log gets
// each session's start and its one end line, metrics (nil: none) the
// outcomes. It makes the state directory, and keeps cfg.Spares workers
// started ahead. Call Adopt next, then Release or Drain at the end.
func NewManager(cfg Config, log *slog.Logger, metrics *Metrics) (*Manager, error) {
	if err := makeStateDir(cfg); err != nil {
		return nil, err
	}
	self := cfg.Worker
	if self == "" {
		// The inode we run, not the path: after an upgrade replaced the
		// file, this daemon still starts workers that speak its version.
		self = "/proc/self/exe"
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	key, err := hostKey(cfg)
	if err != nil {
		return nil, err
	}
	m := &Manager{
		cfg: cfg, log: log, metrics: metrics, self: self, env: workerEnv(), key: key,
		sessions: make(map[string]*managed), places: make(map[string]bool),
		spareStop: make(chan struct{}), spareDone: make(chan struct{}),
		taken: make(chan struct{}, 1), refill: make(chan struct{}, 1),
	}
	if metrics != nil {
		metrics.MaxSessions.Set(float64(cfg.MaxSessions))
	}
	// As root, a worker's exec keeps what the daemon holds (a non-root
	// daemon's CAP_SYS_NICE would not survive it, and its spares could not
	// take the daemon's priority back).
	if n, err := threadNice(0); err == nil && os.Geteuid() == 0 && canRenice() && n < 19 {
		m.nice = &n
	}
	go m.keepSpares()
	go m.rescan()
	return m, nil
}

// workerEnv is the daemon's environment without what is the daemon's
// alone (systemd's notify socket, watchdog and passed sockets).
func workerEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		switch k {
		case "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES":
			continue
		}
		env = append(env, kv)
	}
	return env
}

// spare is a worker started and set up, waiting for its order.
type spare struct {
	cmd     *exec.Cmd
	pidfd   *os.File
	link    *link
	place   string            // its record's place (record.go), removed by kill if it is still there
	forget  func()            // drops the place from Manager.places
	tickets map[string][]byte // the TLS sessions it was given at its setup, per relay
	setupAt time.Time         // when
	woke    time.Time         // its last wake (under Manager.mu)
	wakes   int               // how many it was sent (under Manager.mu)
}

// maxSetupTickets bounds the TLS sessions a worker is given at its setup,
// in bytes (one is a few KiB: its relay's chain), so that the setup fits
// the socket pair's buffer whole.
const maxSetupTickets = 64 << 10

// ticketFresh is how long a spare dials with the TLS session it was given
// at its setup; an older spare gets the relay's newest with its order (a
// relay may rotate its ticket keys: crypto/tls's server does daily).
const ticketFresh = 10 * time.Minute

// startWorker starts a worker and sets it up; a spare (warm) warms up
// before it waits, one started for a session at hand does not (its
// session waits on it).
func (m *Manager) startWorker(warm bool) (*spare, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("worker socket pair: %w", err)
	}
	ours, theirs := os.NewFile(uintptr(fds[0]), "worker"), os.NewFile(uintptr(fds[1]), "daemon")
	defer theirs.Close()
	fc, err := net.FileConn(ours)
	_ = ours.Close()
	if err != nil {
		return nil, err
	}
	pidfd := -1
	cmd := exec.Command(m.self, workerArg)
	cmd.Env = m.env
	cmd.ExtraFiles = []*os.File{theirs}
	cmd.Stderr = m.cfg.workerStderr()
	// A session of its own: the daemon's terminal and process group
	// signals (Ctrl-C on a foreground serve) are not the worker's.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, PidFD: &pidfd}
	start := cmd.Start
	if warm && m.nice != nil {
		start = func() error { return startNiced(cmd, *m.nice) }
	}
	if err := start(); err != nil {
		_ = fc.Close()
		return nil, fmt.Errorf("starting a worker (%s): %w", m.self, err)
	}
	name := newPlace()
	m.mu.Lock()
	m.places[name] = true
	m.mu.Unlock()
	sp := &spare{cmd: cmd, link: newLink(fc.(*net.UnixConn)), place: filepath.Join(m.cfg.sessionsDir(), name)}
	sp.forget = func() {
		m.mu.Lock()
		delete(m.places, name)
		m.mu.Unlock()
	}
	if pidfd < 0 {
		sp.kill()
		return nil, errors.New("no pidfd for the worker: the daemon needs Linux 5.3 or later (CLONE_PIDFD, pidfd_open)")
	}
	sp.pidfd = pollable(pidfd)
	// The newest TLS sessions now, for whichever session it takes: one
	// is good for days (crypto/tls checks its age, and an expired one is a
	// full handshake), and each spare starts with the one the session
	// before it had, so that one ticket is mostly one dial's (for
	// ticketFresh: after it, the order brings the newest).
	// A worker started for a session at hand reads its order at once:
	// the order brings the one session it needs.
	setup := message{Type: "setup", Config: &m.cfg, Key: m.key, Warm: warm, Place: name}
	if warm {
		setup.Nice, setup.Tickets = m.nice, m.tickets.Snapshot(maxSetupTickets)
	}
	sp.tickets, sp.setupAt = setup.Tickets, time.Now()
	if err := sp.link.send(setup); err != nil {
		sp.kill()
		return nil, fmt.Errorf("setting up a worker: %w", err)
	}
	// A spare joins the pool at once: taken while still warming, its
	// session waits for the rest of the warm-up (a few ms), which is less
	// than a worker started cold.
	return sp, nil
}

// kill ends a spare that will get no order, and reaps it; then it removes
// the spare's place (one that became a session's record has another name).
func (sp *spare) kill() {
	sp.link.close() // a spare exits on EOF; the kill is for one that hangs
	_ = sp.cmd.Process.Kill()
	if sp.pidfd == nil {
		_ = sp.cmd.Wait()
		sp.unplace()
		return
	}
	// The process's Wait shares the open file behind our pidfd, which is
	// non-blocking: it would fail (EAGAIN) before the exit, and leave a
	// zombie. So the exit is waited for on the pidfd first, for as long
	// as a SIGKILL takes; one the kernel cannot kill yet (a hung
	// filesystem) is reaped in the background whenever it ends, and holds
	// up neither a create nor a handover.
	_ = sp.pidfd.SetReadDeadline(time.Now().Add(killWait))
	reap := func() {
		_ = sp.cmd.Wait()
		_ = sp.pidfd.Close()
		sp.unplace()
	}
	if waitExit(sp.pidfd) == nil {
		reap()
		return
	}
	go func() {
		_ = sp.pidfd.SetReadDeadline(time.Time{})
		_ = waitExit(sp.pidfd)
		reap()
	}()
}

// ticketFor is what an order to sp brings of relay's newest TLS session:
// nothing when the one its setup gave will do (it is that one, or the
// spare is younger than ticketFresh).
func (sp *spare) ticketFor(relay string, newest []byte) []byte {
	given := sp.tickets[relay]
	if len(given) > 0 && (len(newest) == 0 || &given[0] == &newest[0] || time.Since(sp.setupAt) < ticketFresh) {
		return nil
	}
	return newest
}

// unplace removes the place of a spare that has exited.
func (sp *spare) unplace() {
	_ = os.RemoveAll(sp.place)
	sp.forget()
}

// killWait is how long a spare sent SIGKILL is waited for before it is
// taken to be one the kernel cannot kill yet: a SIGKILL takes a few ms.
const killWait = time.Second

// keepSpares keeps cfg.Spares workers started ahead, until Release or
// Drain. A taken spare is replaced once its session runs (its first output
// byte is out) or after spareDelay: starting a process beside a session
// that is starting would take the CPU it needs, on a small host.
func (m *Manager) keepSpares() {
	defer close(m.spareDone)
	if m.cfg.Spares == 0 {
		return
	}
	for {
		m.mu.Lock()
		full := len(m.spares) >= m.cfg.Spares
		m.mu.Unlock()
		if full {
			// Until one is taken, and its session runs (a taken signal
			// can be an old one: the pool is counted again after it).
			select {
			case <-m.taken:
			case <-m.spareStop:
				return
			}
			select {
			case <-m.refill:
			case <-time.After(spareDelay):
			case <-m.spareStop:
				return
			}
			continue
		}
		sp, err := m.startWorker(true)
		if err != nil {
			m.workerFailed()
			m.log.Error("starting a spare worker", "err", err.Error())
			select {
			case <-m.spareStop:
				return
			case <-time.After(time.Second):
				continue
			}
		}
		m.mu.Lock()
		stopped := m.sparesStopped()
		if !stopped {
			m.spares = append(m.spares, sp)
		}
		m.mu.Unlock()
		if stopped {
			sp.kill()
			return
		}
	}
}

// stopSpares ends the spares and their making.
func (m *Manager) stopSpares() {
	m.mu.Lock()
	if m.sparesStopped() {
		m.mu.Unlock()
		return
	}
	close(m.spareStop)
	m.mu.Unlock()
	<-m.spareDone
	m.mu.Lock()
	spares := m.spares
	m.spares = nil
	m.mu.Unlock()
	for _, sp := range spares {
		sp.kill()
	}
}

// sparesStopped reports whether stopSpares ran (under mu).
func (m *Manager) sparesStopped() bool {
	select {
	case <-m.spareStop:
		return true
	default:
		return false
	}
}

// wakeSpare wakes the spare the next session will take, if one waits:
// a process idle for a while takes 100-200 µs to run again on a small
// virtual host (docs/BENCHMARKS.md), which then overlaps the daemon's
// reading of the request instead of following it. The spare stays in the
// pool, so requests, however many and however slow, take none; and it is
// woken at most once per wakeEvery and maxWakes times, however many come.
func (m *Manager) wakeSpare() {
	m.mu.Lock()
	var sp *spare
	if len(m.spares) > 0 && m.spares[0].wakes < maxWakes && time.Since(m.spares[0].woke) >= wakeEvery {
		sp = m.spares[0]
		sp.woke = time.Now()
		sp.wakes++
	}
	m.mu.Unlock()
	if sp == nil {
		return
	}
	if err := sp.link.send(message{Type: "wake"}); err != nil {
		m.dropSpare(sp) // a spare that cannot be written to can take no order either
	}
}

// wakeEvery is the least time between two wakes of one spare: one woken
// this recently is still running, or has only just stopped.
const wakeEvery = time.Millisecond

// maxWakes bounds the wakes one spare is sent. A spare reads none while it
// warms up, and each costs about 1 KiB of the socket pair's buffer (some
// 200 KiB): unbounded, a stream of requests could fill it, and the next
// wake, or the order, would wait on the write. Past it the spare is no
// longer woken (a flood of requests makes the wake moot anyway).
const maxWakes = 64

// dropSpare ends sp if it is still in the pool, and has it replaced. One
// that a session took meanwhile is the session's: its order fails there.
func (m *Manager) dropSpare(sp *spare) {
	m.mu.Lock()
	i := slices.Index(m.spares, sp)
	if i >= 0 {
		m.spares = slices.Delete(m.spares, i, i+1)
	}
	m.mu.Unlock()
	if i < 0 {
		return
	}
	sp.kill()
	select {
	case m.taken <- struct{}{}:
	default:
	}
}

// takeWorker is a spare from the pool, or a worker started now when every
// spare is taken.
func (m *Manager) takeWorker() (*spare, error) {
	m.mu.Lock()
	var sp *spare
	if len(m.spares) > 0 {
		sp = m.spares[0]
		m.spares = slices.Delete(m.spares, 0, 1)
	}
	m.mu.Unlock()
	if sp == nil {
		return m.startWorker(false) // all spares taken: one now
	}
	select {
	case <-m.refill: // from an earlier session: this one's counts
	default:
	}
	select {
	case m.taken <- struct{}{}:
	default:
	}
	return sp, nil
}

// Spares is how many spare workers wait in the pool now.
func (m *Manager) Spares() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.spares)
}

// Create validates req and starts its session in a worker of its own.
func (m *Manager) Create(req Request) (View, error) {
	return m.create(req, Caller{}, DefaultAccess())
}

func (m *Manager) create(req Request, caller Caller, a Access) (View, error) {
	spec, err := specFor(m.cfg, req)
	if err != nil {
		return View{}, err
	}
	if err := a.check(spec); err != nil {
		return View{}, err
	}
	hash := secretHash(m.key, spec.URL.Secret)
	m.mu.Lock()
	switch {
	case m.closing:
		m.mu.Unlock()
		return View{}, ErrShuttingDown
	case m.running >= m.cfg.MaxSessions:
		m.mu.Unlock()
		return View{}, ErrFull
	}
	for _, o := range m.sessions {
		if o.ended.IsZero() && o.rec.SecretHash == hash && o.rec.About.Relay == spec.URL.Addr() {
			m.mu.Unlock()
			return View{}, ErrDuplicate
		}
	}
	m.prune(time.Now())
	// The session holds its place (the count, its secret) while its
	// worker takes the order.
	s := &managed{id: newID(), ready: make(chan struct{}), done: make(chan struct{})}
	s.rec = record{ID: s.id, StartedAt: time.Now(), About: spec.About(), SecretHash: hash}
	m.sessions[s.id] = s
	m.running++
	m.creating.Add(1)
	m.mu.Unlock()
	defer m.creating.Done()
	m.changed()

	fail := func(err error) (View, error) {
		m.mu.Lock()
		delete(m.sessions, s.id)
		m.running--
		s.ended = time.Now()
		m.mu.Unlock()
		close(s.ready)
		close(s.done) // for a drain that counted it
		m.changed()
		return View{}, err
	}
	sp, err := m.takeWorker()
	if err != nil {
		m.workerFailed()
		return fail(err)
	}
	relay := tlsdial.TicketKey(nil, spec.URL) // the relay's name, for its TLS sessions
	rec, err := m.hand(sp, order{ID: s.id, Request: req, Caller: &caller, DenyRoot: !a.AllowRootUser}, relay)
	if err != nil {
		m.workerFailed()
		sp.kill()
		// What it may have started (a record, a command once paired)
		// ends with it.
		dir := filepath.Join(m.cfg.sessionsDir(), s.id)
		if _, serr := os.Lstat(dir); serr == nil {
			_ = m.lost(dir, s.rec)
			_ = os.RemoveAll(dir)
		}
		return fail(err)
	}
	sp.forget() // its place is the session's record now
	m.mu.Lock()
	s.rec, s.link, s.pidfd, s.own = rec, sp.link, sp.pidfd, true
	released := m.released
	if !released {
		m.watchers.Add(1)
	}
	m.mu.Unlock()
	close(s.ready)
	if released {
		// Handed over while it started: the next daemon adopts it.
		return m.view(s), nil
	}
	_ = sp.cmd.Process.Release() // reaped by pid in watch
	m.log.Info("session started", "session_id", s.id, "secret_fp", rec.About.SecretFP, "relay", rec.About.Relay,
		"caller_uid", caller.UID, "caller_pid", caller.PID, "worker_pid", rec.PID)
	go m.watch(s)
	go m.listen(s, sp.link, relay)
	return m.view(s), nil
}

// hand gives a worker its order, with the newest TLS session a worker
// had with its relay unless the one its setup gave will do, and waits
// (bounded) for its record.
func (m *Manager) hand(sp *spare, o order, relay string) (record, error) {
	if err := sp.link.send(message{Type: "order", Order: &o, Ticket: sp.ticketFor(relay, m.tickets.For(relay))}); err != nil {
		return record{}, fmt.Errorf("handing the session to its worker: %w", err)
	}
	_ = sp.link.c.SetReadDeadline(time.Now().Add(m.cfg.SetupTimeout))
	reply, err := sp.link.recv()
	_ = sp.link.c.SetReadDeadline(time.Time{})
	switch {
	case err != nil:
		return record{}, fmt.Errorf("the session's worker did not take it: %w", err)
	case reply.Type == "refused":
		return record{}, fmt.Errorf("the session's worker refused it: %s", reply.Error)
	case reply.Type != "accepted" || reply.Record == nil:
		return record{}, fmt.Errorf("the session's worker answered %q", reply.Type)
	}
	return *reply.Record, nil
}

// listen reads what a worker says until the link ends; the end itself is
// seen by watch, from the process. A TLS session it reports is kept for
// relay's next worker when relay is named: only for a worker this daemon
// started, on the socket pair it made, never one a control socket in the
// state directory answers for (what the next worker imports is trusted as
// a verified chain: tlsdial.Tickets).
func (m *Manager) listen(s *managed, l *link, relay string) {
	for {
		msg, err := l.recv()
		if err != nil {
			return
		}
		if msg.Type == "running" {
			// Kept first: the spare the refill starts is given it.
			m.tickets.Keep(relay, msg.Ticket)
			select {
			case m.refill <- struct{}{}:
			default:
			}
		}
	}
}

// watch waits for the worker's exit, then reports the session.
func (m *Manager) watch(s *managed) {
	defer m.watchers.Done()
	if err := waitExit(s.pidfd); err != nil {
		return // released: the next daemon watches it
	}
	m.mu.Lock()
	released := m.released
	m.mu.Unlock()
	if released {
		return
	}
	if s.own {
		var ws unix.WaitStatus
		_, _ = unix.Wait4(s.rec.PID, &ws, unix.WNOHANG, nil) // it has exited: this does not block
	}
	_ = s.pidfd.Close()
	m.finish(s)
}

// finish records the session's end: its result.json, or, when its worker
// died without one, agent_error with the worker's leftovers ended.
func (m *Manager) finish(s *managed) {
	dir := filepath.Join(m.cfg.sessionsDir(), s.id)
	var r result
	if err := readFile(dir, resultFile, &r); err != nil {
		r = m.lost(dir, s.rec)
	}
	res := r.agentResult()
	m.mu.Lock()
	s.result, s.ended = res, r.EndedAt
	if s.link != nil {
		s.link.close()
		s.link = nil
	}
	m.running--
	m.mu.Unlock()
	// Logged and counted before anyone waiting hears of the end.
	m.report(dir, s.id, s.rec, res)
	close(s.done)
	m.changed()
}

// lost ends what a worker that died without a result left: its command's
// process group (when it is still the process recorded) and its groups.
func (m *Manager) lost(dir string, rec record) result {
	r := agent.Result{Reason: ptyio.ReasonAgentError, ExitCode: agent.ExitAgentError, Err: errWorkerLost}
	var cmd process
	if readFile(dir, commandFile, &cmd) == nil {
		r.Started = true
		if cmd.PID > 0 && cmd.alive() {
			_ = syscall.Kill(-cmd.PID, syscall.SIGKILL)
			_ = syscall.Kill(cmd.PID, syscall.SIGKILL)
		}
	}
	n := 0
	if rec.PID > 0 && rec.Start != "" {
		n = container.ReleaseOwned(rec.PID, rec.Start)
	}
	m.log.Warn("session worker lost", "session_id", rec.ID, "worker_pid", rec.PID, "command_pid", cmd.PID, "cgroups_removed", n)
	return resultOf(r, time.Now())
}

// report logs the end line and counts the outcome, once per session
// across daemons (the record's reported marker), and removes the record.
func (m *Manager) report(dir, id string, rec record, res agent.Result) {
	if !claimReport(dir) {
		return // another daemon saw the end first, and logged it
	}
	agent.LogResult(m.log.With("session_id", id), rec.About, res)
	m.metrics.observe(rec.Place, res)
	_ = os.RemoveAll(dir)
}

func (m *Manager) workerFailed() {
	if m.metrics != nil {
		m.metrics.WorkerFailures.Inc()
	}
}

func (m *Manager) changed() {
	m.mu.Lock()
	n := m.running
	m.mu.Unlock()
	if m.metrics != nil {
		m.metrics.Active.Set(float64(n))
	}
	if m.cfg.onChange != nil {
		m.cfg.onChange(n)
	}
}

// Adopt takes over the sessions whose records are in the state directory:
// a live worker (its pid and start time match) is watched as if this
// daemon had started it; an ended one is reported; one whose worker died
// without a result (or whose pid now names another process, which is
// never signalled) is reported as agent_error, its leftovers ended. It
// returns how many it adopted and how many it reported.
func (m *Manager) Adopt() (adopted, reported int) {
	entries, err := os.ReadDir(m.cfg.sessionsDir())
	if err != nil {
		m.log.Warn("reading the session records", "err", err.Error())
		return 0, 0
	}
	for _, e := range entries {
		if e.IsDir() && validPlace(e.Name()) {
			m.sweepPlace(e)
			continue
		}
		if !e.IsDir() || !validID(e.Name()) {
			continue // not a record of ours: never touched
		}
		dir := filepath.Join(m.cfg.sessionsDir(), e.Name())
		m.mu.Lock()
		_, known := m.sessions[e.Name()]
		m.mu.Unlock()
		if known {
			continue
		}
		if _, err := os.Lstat(filepath.Join(dir, reportedFile)); err == nil {
			// Its end was logged by a daemon that died before it removed
			// the record.
			_ = os.RemoveAll(dir)
			continue
		}
		var rec record
		if err := readFile(dir, workerFile, &rec); err != nil || rec.ID != e.Name() {
			// No worker.json: a worker of an older version writing it now
			// (its record was made before worker.json; a current one's
			// appears with it), or one that died before it was whole.
			// Removed only when it is abandoned; a record that is there
			// but unreadable is left for the operator.
			if os.IsNotExist(err) && m.abandoned(e) {
				m.log.Warn("removing an incomplete session record", "dir", dir)
				_ = os.RemoveAll(dir)
			} else if err != nil && !os.IsNotExist(err) {
				m.log.Error("unreadable session record: left alone", "dir", dir, "err", err.Error())
			}
			continue
		}
		s := &managed{id: rec.ID, rec: rec, adopted: true, ready: make(chan struct{}), done: make(chan struct{})}
		close(s.ready)
		w := process{rec.PID, rec.Start}
		fd, perr := unix.PidfdOpen(rec.PID, unix.PIDFD_NONBLOCK)
		if perr != nil && !errors.Is(perr, unix.ESRCH) {
			// Not "gone": out of fds, or no pidfds. The worker may be
			// alive: it is not declared lost; a later scan tries again.
			m.log.Error("cannot watch a session's worker: left for a later scan", "session_id", rec.ID, "worker_pid", rec.PID, "err", perr.Error())
			continue
		}
		if perr == nil && w.alive() { // checked after the pidfd pins the process
			s.pidfd = os.NewFile(uintptr(fd), "worker")
			s.link = m.connect(dir)
			m.mu.Lock()
			m.sessions[s.id] = s
			m.running++
			m.watchers.Add(1)
			m.mu.Unlock()
			m.log.Info("session adopted", "session_id", s.id, "worker_pid", rec.PID, "secret_fp", rec.About.SecretFP)
			go m.watch(s)
			if s.link != nil {
				go m.listen(s, s.link, "")
			}
			adopted++
			if m.metrics != nil {
				m.metrics.Adopted.Inc()
			}
			continue
		}
		if perr == nil {
			_ = unix.Close(fd)
			m.log.Warn("session not adopted: its worker's pid names another process now", "session_id", rec.ID, "worker_pid", rec.PID)
		}
		m.mu.Lock()
		m.sessions[s.id] = s
		m.running++
		m.mu.Unlock()
		m.finish(s)
		reported++
	}
	m.changed()
	return adopted, reported
}

// sweepPlace removes a spare's place (record.go) that none of our spares
// has, once it is older than a worker's setup could take and nobody
// answers on its socket: a spare that died without removing it, such as
// one killed with its daemon. Our own spares' places are never probed
// (each probe would wait in its socket's queue while the spare waits).
func (m *Manager) sweepPlace(e os.DirEntry) {
	m.mu.Lock()
	ours := m.places[e.Name()]
	m.mu.Unlock()
	if ours {
		return
	}
	if m.abandoned(e) {
		dir := filepath.Join(m.cfg.sessionsDir(), e.Name())
		m.log.Info("removing a spare worker's leftover record place", "dir", dir)
		_ = os.RemoveAll(dir)
	}
}

// abandoned reports whether e, a record or a place in the sessions
// directory, is older than a worker's setup could take and nobody answers
// on its control socket.
func (m *Manager) abandoned(e os.DirEntry) bool {
	fi, err := e.Info()
	return err == nil && time.Since(fi.ModTime()) > 2*m.cfg.SetupTimeout && !answers(filepath.Join(m.cfg.sessionsDir(), e.Name()))
}

// validID reports whether name is a session ID as newID makes them: the
// only names in the state directory a daemon reads or removes.
func validID(name string) bool {
	if len(name) != 18 || !strings.HasPrefix(name, "s-") {
		return false
	}
	_, err := hex.DecodeString(name[2:])
	return err == nil
}

// answers reports whether something listens on dir's control socket.
func answers(dir string) bool {
	c, err := net.DialTimeout("unix", filepath.Join(dir, controlFile), time.Second)
	if errors.Is(err, syscall.EAGAIN) {
		return true // a listener whose queue is full: someone is there
	}
	if err != nil {
		return false
	}
	_ = c.Close()
	return true
}

// rescanEvery is how often the state directory is read again for records
// this daemon does not know: a session a daemon before it was still
// handing to its worker when it went, or one its scan could not watch.
const rescanEvery = 5 * time.Second

func (m *Manager) rescan() {
	t := time.NewTicker(rescanEvery)
	defer t.Stop()
	for {
		select {
		case <-t.C:
		case <-m.spareStop:
			return
		}
		m.mu.Lock()
		stop := m.closing
		m.mu.Unlock()
		if stop {
			return
		}
		if a, r := m.Adopt(); a+r > 0 {
			m.log.Info("sessions taken over on a rescan", "adopted", a, "reported_ended", r)
		}
	}
}

// connect reaches a worker on its control socket; nil when it cannot be.
func (m *Manager) connect(dir string) *link {
	c, err := net.DialTimeout("unix", filepath.Join(dir, controlFile), 2*time.Second)
	if err != nil {
		return nil
	}
	l := newLink(c.(*net.UnixConn))
	_ = l.c.SetReadDeadline(time.Now().Add(2 * time.Second))
	hello, err := l.recv()
	_ = l.c.SetReadDeadline(time.Time{})
	if err != nil || hello.Type != "hello" {
		l.close()
		return nil
	}
	return l
}

// tell asks a worker to end its session, over its link or a new one; a
// worker that cannot be reached gets SIGTERM (it ends as shutdown).
func (m *Manager) tell(s *managed, cause string) {
	m.mu.Lock()
	l, fd := s.link, s.pidfd
	ended := !s.ended.IsZero()
	m.mu.Unlock()
	if ended {
		return
	}
	if l != nil && l.send(message{Type: "end", Cause: cause}) == nil {
		return
	}
	if l = m.connect(filepath.Join(m.cfg.sessionsDir(), s.id)); l != nil {
		err := l.send(message{Type: "end", Cause: cause})
		m.mu.Lock()
		if s.link != nil {
			s.link.close()
		}
		s.link = l
		m.mu.Unlock()
		go m.listen(s, l, "")
		if err == nil {
			return
		}
	}
	if fd != nil {
		m.log.Warn("session worker unreachable: SIGTERM", "session_id", s.id, "worker_pid", s.rec.PID)
		_ = signalFD(fd, syscall.SIGTERM)
	}
}

// Release hands the sessions over: no new ones, the spares ended, and the
// running workers let go of (links closed, no longer watched). They go on
// to their ends; the next daemon adopts them.
func (m *Manager) Release() {
	m.mu.Lock()
	m.closing = true
	m.mu.Unlock()
	// Creates in flight finish first (a worker answers within the setup
	// timeout): a session created is then watched, or known to the next
	// daemon's scan. Past the bound the next daemon's rescan finds it.
	created := make(chan struct{})
	go func() { m.creating.Wait(); close(created) }()
	select {
	case <-created:
	case <-time.After(HandoverTimeout / 4):
		m.log.Warn("handing over with a session still being created: the next daemon's scan adopts it")
	}
	m.mu.Lock()
	m.released = true
	for _, s := range m.sessions {
		if s.link != nil {
			s.link.close()
			s.link = nil
		}
		if s.pidfd != nil && s.ended.IsZero() {
			_ = s.pidfd.Close() // its watcher returns
		}
	}
	m.mu.Unlock()
	m.stopSpares()
	m.watchers.Wait()
}

// Drain ends every session: no new ones from now on, the running ones may
// finish within grace, then the rest end with reason shutdown (their
// workers killed if they have not ended a bound later). It returns the
// sessions that ended meanwhile.
func (m *Manager) Drain(ctx context.Context, grace time.Duration) []View {
	m.mu.Lock()
	m.closing = true
	var live []*managed
	for _, s := range m.sessions {
		if s.ended.IsZero() {
			live = append(live, s)
		}
	}
	m.mu.Unlock()
	m.stopSpares()
	m.log.Info("draining", "active", len(live), "grace", grace.String())
	all := func(ctx context.Context) bool {
		for _, s := range live {
			select {
			case <-s.done:
			case <-ctx.Done():
				return false
			}
		}
		return true
	}
	gctx, cancel := context.WithTimeout(ctx, grace)
	done := all(gctx)
	cancel()
	if !done {
		for _, s := range live {
			// One still being handed to its worker is told once it is.
			select {
			case <-s.ready:
			case <-time.After(m.cfg.SetupTimeout):
			}
			m.tell(s, causeShutdown)
		}
		// The pump's own bounds end a session told so: the kill grace,
		// then the drain of its output. Past them, the worker is killed.
		p := m.cfg.Pump
		bound := max(p.KillGrace, ptyio.DefaultKillGrace) + max(p.DrainTimeout, ptyio.DefaultDrainTimeout) + max(p.Linger, ptyio.DefaultLinger) + 10*time.Second
		kctx, kcancel := context.WithTimeout(context.Background(), bound)
		if !all(kctx) {
			for _, s := range live {
				m.mu.Lock()
				fd, ended := s.pidfd, !s.ended.IsZero()
				m.mu.Unlock()
				if !ended && fd != nil {
					m.log.Error("session worker did not end: SIGKILL", "session_id", s.id, "worker_pid", s.rec.PID)
					_ = signalFD(fd, syscall.SIGKILL)
				}
			}
			// A killed worker is seen at once; this bound is for one the
			// kernel cannot kill (a hung filesystem), which stays running.
			lctx, lcancel := context.WithTimeout(context.Background(), 30*time.Second)
			if !all(lctx) {
				m.log.Error("drain: a session's worker outlived SIGKILL; it is left running")
			}
			lcancel()
		}
		kcancel()
	}
	out := make([]View, len(live))
	for i, s := range live {
		out[i] = m.view(s)
	}
	return out
}

// prune forgets ended sessions past KeepEnded, and the oldest beyond
// KeepEndedCount. m.mu is held.
func (m *Manager) prune(now time.Time) {
	var ended []*managed
	for id, s := range m.sessions {
		if s.ended.IsZero() {
			continue
		}
		if now.Sub(s.ended) > m.cfg.KeepEnded {
			delete(m.sessions, id)
			continue
		}
		ended = append(ended, s)
	}
	if over := len(ended) - m.cfg.KeepEndedCount; over > 0 {
		sort.Slice(ended, func(i, j int) bool { return ended[i].ended.Before(ended[j].ended) })
		for _, s := range ended[:over] {
			delete(m.sessions, s.id)
		}
	}
}

func newID() string {
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	return "s-" + hex.EncodeToString(b)
}

func (m *Manager) view(s *managed) View {
	m.mu.Lock()
	defer m.mu.Unlock()
	a := s.rec.About
	v := View{
		ID: s.id, State: "running", Relay: a.Relay, SecretFP: a.SecretFP, Labels: a.Labels, StartedAt: s.rec.StartedAt,
		User: a.User, Caller: a.Caller, Container: s.rec.Container, Adopted: s.adopted,
	}
	if s.ended.IsZero() {
		v.WorkerPID = s.rec.PID
		return v
	}
	r := s.result
	ended := s.ended
	code := r.ExitCode
	v.State, v.Reason, v.ExitCode, v.EndedAt = "ended", string(r.Reason), &code, &ended
	v.BytesIn, v.BytesOut, v.CommandRan, v.DialTries = r.BytesIn, r.BytesOut, r.Started, r.Timings.Attempts
	if r.Signal != 0 {
		v.Signal = r.Signal.String()
	}
	if r.Err != nil {
		v.Error = r.Err.Error()
	}
	t := r.Timings
	v.TimingsMS = map[string]int64{
		"connect": ms(t.Connect), "tls": ms(t.TLS), "dial": ms(t.Dial), "pair": ms(t.Pair),
		"spawn": ms(t.Spawn), "first_output": ms(t.FirstOutput), "total": ms(t.Total),
	}
	return v
}

func ms(d time.Duration) int64 { return d.Milliseconds() }

func (m *Manager) lookup(id string) (*managed, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	s, ok := m.sessions[id]
	return s, ok
}

// Get returns a session's view.
func (m *Manager) Get(id string) (View, bool) {
	s, ok := m.lookup(id)
	if !ok {
		return View{}, false
	}
	return m.view(s), true
}

// Wait returns the session's view once it ends or ctx is done.
func (m *Manager) Wait(ctx context.Context, id string) (View, bool) {
	s, ok := m.lookup(id)
	if !ok {
		return View{}, false
	}
	select {
	case <-s.done:
	case <-ctx.Done():
	}
	return m.view(s), true
}

// List returns every session known, newest first.
func (m *Manager) List() []View {
	m.mu.Lock()
	all := make([]*managed, 0, len(m.sessions))
	for _, s := range m.sessions {
		all = append(all, s)
	}
	m.mu.Unlock()
	sort.Slice(all, func(i, j int) bool { return all[i].rec.StartedAt.After(all[j].rec.StartedAt) })
	out := make([]View, len(all))
	for i, s := range all {
		out[i] = m.view(s)
	}
	return out
}

// Kill ends a running session with reason killed.
func (m *Manager) Kill(id string) bool {
	s, ok := m.lookup(id)
	if ok {
		m.tell(s, causeKilled)
	}
	return ok
}

// Active is how many sessions run now.
func (m *Manager) Active() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.running
}

// Closing reports whether the daemon takes no new sessions (a drain or a
// handover has begun).
func (m *Manager) Closing() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.closing
}

// pollable makes fd (a pidfd) non-blocking and an *os.File that Go's
// poller waits on, so that a thousand watched workers hold no thread.
func pollable(fd int) *os.File {
	_ = unix.SetNonblock(fd, true)
	return os.NewFile(uintptr(fd), "worker")
}

// waitExit returns once the process behind pidfd f has exited, or with an
// error once f is closed.
func waitExit(f *os.File) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	return rc.Read(func(fd uintptr) bool {
		n, _ := unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}, 0)
		return n > 0
	})
}

func signalFD(f *os.File, sig syscall.Signal) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := rc.Control(func(fd uintptr) { serr = unix.PidfdSendSignal(int(fd), sig, nil, 0) }); err != nil {
		return err
	}
	return serr
}
