package agent

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/attach-agent/attach-agent/container"
	"github.com/attach-agent/attach-agent/ptyio"
	"github.com/attach-agent/attach-agent/tlsdial"
)

// ManagerConfig is the daemon's session policy. Zero fields mean the
// defaults named on each.
type ManagerConfig struct {
	Dial tlsdial.Config // how to reach relays (CA, client certificate, dial bounds)
	Pump ptyio.Config   // default per-session bounds

	MaxSessions    int           // running at once; zero: 1000
	MaxPairTimeout time.Duration // the most a request may ask for; zero: 10m
	MaxIdleTimeout time.Duration // zero: 24h
	MaxMaxDuration time.Duration // zero: 7 days
	KeepEnded      time.Duration // how long ended sessions stay queryable; zero: 1h
	KeepEndedCount int           // and how many at most; zero: 10000
	// DefaultPids is the pids limit of a host session or sandbox whose
	// request names none ("limits": {"pids": 0} asks for none); zero: none.
	DefaultPids int64
	// SetupTimeout bounds a session's setup once paired (see
	// Spec.SetupTimeout); zero: container.DefaultSetupTimeout.
	SetupTimeout    time.Duration
	Logger          *slog.Logger // nil: none
	Metrics         *Metrics     // nil: none
	OnSessionChange func(active int)
	// Fault, for tests, is every session's Spec.Fault. Nil in production.
	Fault func(point string)
}

// Errors Create returns besides *RequestError.
var (
	ErrFull         = errors.New("too many sessions running: retry later")
	ErrShuttingDown = errors.New("the agent is shutting down: not taking new sessions")
	ErrDuplicate    = errors.New("a running session already has this attach_url's secret: two would pair with each other; end it first, or use a new secret")
)

// RequestError is a bad field of a request.
type RequestError struct{ Field, Problem string }

func (e *RequestError) Error() string { return e.Field + ": " + e.Problem }

// Request is a session to start, as the control API takes it.
type Request struct {
	AttachURL        string            `json:"attach_url"`
	Command          json.RawMessage   `json:"command"` // a string for bash -c, or an argv array
	Env              map[string]string `json:"env,omitempty"`
	TTY              *bool             `json:"tty,omitempty"` // default true
	Raw              bool              `json:"raw,omitempty"`
	Cols             int               `json:"cols,omitempty"`
	Lines            int               `json:"lines,omitempty"`
	Dir              string            `json:"dir,omitempty"`
	User             string            `json:"user,omitempty"`
	ExitStatusMarker bool              `json:"exit_status_marker,omitempty"`
	PairTimeout      string            `json:"pair_timeout,omitempty"`
	IdleTimeout      string            `json:"idle_timeout,omitempty"`
	MaxDuration      string            `json:"max_duration,omitempty"`
	Labels           map[string]string `json:"labels,omitempty"`
	Container        json.RawMessage   `json:"container,omitempty"`
}

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
}

type managed struct {
	id      string
	spec    Spec
	started time.Time
	cancel  context.CancelCauseFunc
	done    chan struct{}
	ended   time.Time
	result  Result
}

// Manager runs the daemon's sessions side by side.
type Manager struct {
	cfg ManagerConfig

	mu       sync.Mutex
	sessions map[string]*managed
	running  int
	closing  bool
	wg       sync.WaitGroup
}

// NewManager makes a Manager with cfg.
func NewManager(cfg ManagerConfig) *Manager {
	def := func(d *time.Duration, v time.Duration) {
		if *d == 0 {
			*d = v
		}
	}
	def(&cfg.MaxPairTimeout, 10*time.Minute)
	def(&cfg.MaxIdleTimeout, 24*time.Hour)
	def(&cfg.MaxMaxDuration, 7*24*time.Hour)
	def(&cfg.KeepEnded, time.Hour)
	if cfg.MaxSessions == 0 {
		cfg.MaxSessions = 1000
	}
	if cfg.KeepEndedCount == 0 {
		cfg.KeepEndedCount = 10000
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	return &Manager{cfg: cfg, sessions: make(map[string]*managed)}
}

// Spec turns a request into a session spec, or says which field is wrong.
func (m *Manager) Spec(req Request) (Spec, error) {
	var sp Spec
	bad := func(field, format string, a ...any) (Spec, error) {
		return sp, &RequestError{field, fmt.Sprintf(format, a...)}
	}
	if req.AttachURL == "" {
		return bad("attach_url", "required: rendezvous://HOST:PORT/SECRET")
	}
	u, err := tlsdial.Parse(req.AttachURL)
	if err != nil {
		return bad("attach_url", "%s", strings.TrimPrefix(err.Error(), "attach url: "))
	}
	var ctr container.Spec
	if len(req.Container) > 0 && string(req.Container) != "null" {
		dec := json.NewDecoder(bytes.NewReader(req.Container))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&ctr); err != nil {
			return bad("container", "want {\"pid\": N} or {\"rootfs\": DIR, \"hostname\": NAME, \"network\": \"host\"|\"none\", \"limits\": {...}}: %v", err)
		}
	}
	if ctr.PID == 0 && !namesPids(req.Container) {
		ctr.Limits.Pids = m.cfg.DefaultPids
	}
	if err := ctr.Validate(); err != nil {
		return bad("container", "%s", strings.TrimPrefix(err.Error(), "container: "))
	}
	if err := container.CheckUserSpec(req.User); req.User != "" && err != nil {
		return bad("user", "%v", err)
	}
	argv, err := commandArgv(req.Command, ctr.Shell())
	if err != nil {
		return bad("command", "%v", err)
	}
	tty := req.TTY == nil || *req.TTY
	if req.Raw && !tty {
		return bad("raw", "needs a pty: it conflicts with \"tty\": false")
	}
	for _, f := range []struct {
		name string
		v    int
	}{{"cols", req.Cols}, {"lines", req.Lines}} {
		if f.v < 0 || f.v > 65535 {
			return bad(f.name, "%d is out of range 1..65535", f.v)
		}
	}
	env := make([]string, 0, len(req.Env))
	for k, v := range req.Env {
		if k == "" || strings.ContainsAny(k, "=\x00") || strings.Contains(v, "\x00") {
			return bad("env", "variable %q: names must be non-empty without '=' or NUL, values without NUL", k)
		}
		env = append(env, k+"="+v)
	}
	sort.Strings(env)
	pc := m.cfg.Pump
	pc.EOFByte = !tty
	dial := m.cfg.Dial
	for _, d := range []struct {
		name  string
		in    string
		limit time.Duration
		dst   *time.Duration
	}{
		{"pair_timeout", req.PairTimeout, m.cfg.MaxPairTimeout, &dial.PairTimeout},
		{"idle_timeout", req.IdleTimeout, m.cfg.MaxIdleTimeout, &pc.IdleTimeout},
		{"max_duration", req.MaxDuration, m.cfg.MaxMaxDuration, &pc.MaxDuration},
	} {
		if d.in == "" {
			continue
		}
		v, err := time.ParseDuration(d.in)
		if err != nil || v <= 0 {
			return bad(d.name, "%q is not a positive Go duration such as \"30s\" or \"1h\"", d.in)
		}
		if v > d.limit {
			return bad(d.name, "%v is over the operator's limit of %v", v, d.limit)
		}
		*d.dst = v
	}
	for k := range req.Labels {
		if k == "" || strings.ContainsFunc(k, func(r rune) bool {
			return !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '_')
		}) {
			return bad("labels", "key %q: use letters, digits and '_'", k)
		}
	}
	return Spec{
		URL: u, Dial: dial, Pump: pc, ExitStatusMarker: req.ExitStatusMarker, Labels: req.Labels,
		User: req.User, Container: ctr, SetupTimeout: m.cfg.SetupTimeout,
		Process: ptyio.Spec{Argv: argv, Env: env, Dir: req.Dir, TTY: tty, Raw: req.Raw, Cols: uint16(req.Cols), Rows: uint16(req.Lines)},
	}, nil
}

// commandArgv is the command as argv; a string runs with shell -c.
func commandArgv(raw json.RawMessage, shell string) ([]string, error) {
	if len(raw) == 0 || string(raw) == "null" {
		return nil, errors.New("required: a string (run with bash -c) or an array of strings (argv)")
	}
	var s string
	if err := json.Unmarshal(raw, &s); err == nil {
		if strings.TrimSpace(s) == "" {
			return nil, errors.New("empty command string")
		}
		return []string{shell, "-c", s}, nil
	}
	var argv []string
	if err := json.Unmarshal(raw, &argv); err != nil {
		return nil, errors.New("must be a string or an array of strings")
	}
	if len(argv) == 0 || argv[0] == "" {
		return nil, errors.New("empty argv: the first element names the program")
	}
	return argv, nil
}

// Create validates req and starts the session in the background.
func (m *Manager) Create(req Request) (View, error) {
	return m.create(req, Caller{}, DefaultAccess())
}

func (m *Manager) create(req Request, caller Caller, a Access) (View, error) {
	spec, err := m.Spec(req)
	if err != nil {
		return View{}, err
	}
	if err := a.check(spec); err != nil {
		return View{}, err
	}
	spec.DenyRoot = !a.AllowRootUser
	spec.Caller = &caller
	spec.Fault = m.cfg.Fault
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
		if o.ended.IsZero() && o.spec.URL.Secret == spec.URL.Secret && o.spec.URL.Addr() == spec.URL.Addr() {
			m.mu.Unlock()
			return View{}, ErrDuplicate
		}
	}
	m.prune(time.Now())
	ctx, cancel := context.WithCancelCause(context.Background())
	s := &managed{id: newID(), spec: spec, started: time.Now(), cancel: cancel, done: make(chan struct{})}
	s.spec.ID = s.id
	m.sessions[s.id] = s
	m.running++
	active := m.running
	m.wg.Add(1)
	m.mu.Unlock()
	if m.cfg.Metrics != nil {
		m.cfg.Metrics.Active.Inc()
	}
	m.changed(active)
	log := m.cfg.Logger.With("session_id", s.id)
	log.Info("session started", "secret_fp", spec.URL.Fingerprint(), "relay", spec.URL.Addr(),
		"caller_uid", caller.UID, "caller_pid", caller.PID)
	go func() {
		defer m.wg.Done()
		r := Run(ctx, s.spec, log)
		cancel(nil)
		m.mu.Lock()
		s.result, s.ended = r, time.Now()
		m.running--
		active := m.running
		m.mu.Unlock()
		close(s.done)
		if m.cfg.Metrics != nil {
			m.cfg.Metrics.Active.Dec()
			m.cfg.Metrics.observe(s.spec, r)
		}
		m.changed(active)
	}()
	return m.view(s), nil
}

func (m *Manager) changed(active int) {
	if m.cfg.OnSessionChange != nil {
		m.cfg.OnSessionChange(active)
	}
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
	v := View{
		ID: s.id, State: "running", Relay: s.spec.URL.Addr(), SecretFP: s.spec.URL.Fingerprint(),
		Labels: s.spec.Labels, StartedAt: s.started, User: s.spec.User, Caller: s.spec.Caller,
	}
	if !s.spec.Container.IsZero() {
		ctr := s.spec.Container
		v.Container = &ctr
	}
	if s.ended.IsZero() {
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
	sort.Slice(all, func(i, j int) bool { return all[i].started.After(all[j].started) })
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
		s.cancel(errors.New("deleted through the control API"))
	}
	return ok
}

// Active is how many sessions run now.
func (m *Manager) Active() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.running
}

// Shutdown stops taking sessions, lets running ones finish until ctx ends,
// then ends the rest with reason shutdown and waits for them.
func (m *Manager) Shutdown(ctx context.Context) {
	m.mu.Lock()
	m.closing = true
	m.mu.Unlock()
	done := make(chan struct{})
	go func() { m.wg.Wait(); close(done) }()
	select {
	case <-done:
		return
	case <-ctx.Done():
	}
	m.mu.Lock()
	for _, s := range m.sessions {
		s.cancel(ptyio.ErrShutdown)
	}
	m.mu.Unlock()
	<-done
}

// Closing reports whether Shutdown has begun.
func (m *Manager) Closing() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.closing
}

// namesPids reports whether a request's container object sets
// limits.pids, so that an explicit 0 (no limit) is told from absent (the
// operator's default).
func namesPids(raw json.RawMessage) bool {
	var probe struct {
		Limits struct {
			Pids *int64 `json:"pids"`
		} `json:"limits"`
	}
	return len(raw) > 0 && json.Unmarshal(raw, &probe) == nil && probe.Limits.Pids != nil
}
