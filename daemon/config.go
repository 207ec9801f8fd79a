package daemon

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/coreos/go-systemd/v22/journal"

	"github.com/attach-agent/attach-agent/agent"
	"github.com/attach-agent/attach-agent/container"
	"github.com/attach-agent/attach-agent/ptyio"
	"github.com/attach-agent/attach-agent/tlsdial"
)

// DefaultControl is where the daemon listens for the lifecycle manager.
const DefaultControl = "/run/attach-agent/control.sock"

// DefaultStateDir holds a record per session (sessions/ID), which a
// restarted daemon adopts its workers from: a tmpfs, as sessions do not
// outlive the host.
const DefaultStateDir = "/run/attach-agent"

// What SIGTERM does (Config.OnSIGTERM).
const (
	// OnSIGTERMHandover: the daemon exits within HandoverTimeout and its
	// workers go on; the next daemon adopts them. For hosts where workers
	// outlive the daemon's stop (systemd with KillMode=process).
	OnSIGTERMHandover = "handover"
	// OnSIGTERMDrain: drain (no new sessions; running ones may finish for
	// ShutdownGrace, then end as shutdown), then exit. For orchestrators
	// that kill whatever the task left (Kubernetes, Nomad).
	OnSIGTERMDrain = "drain"
)

// HandoverTimeout bounds the daemon's exit on a handover.
const HandoverTimeout = 2 * time.Second

// Config is everything the daemon runs with. Start from DefaultConfig;
// Validate says which field cannot work. The fields with JSON names are
// what a worker is handed (never a secret: a session's comes with its
// order).
type Config struct {
	Control       string `json:"-"` // unix socket path of the control API (socket activation wins)
	MetricsListen string `json:"-"` // address for /metrics; empty: off
	LogFormat     string `json:"log_format"`
	StateDir      string `json:"state_dir"` // STATE/sessions/ID per session
	OnSIGTERM     string `json:"-"`         // OnSIGTERMHandover or OnSIGTERMDrain
	// ShutdownGrace is how long running sessions may finish on a drain
	// that names no grace (and on SIGTERM with OnSIGTERMDrain).
	ShutdownGrace time.Duration `json:"-"`

	// CA, Cert and Key are PEM files for the relay's TLS (CA empty:
	// system roots; Cert and Key for mutual TLS), read by each worker.
	CA   string         `json:"ca,omitempty"`
	Cert string         `json:"cert,omitempty"`
	Key  string         `json:"key,omitempty"`
	Dial tlsdial.Config `json:"dial"` // bounds and Plain; its TLS is made from CA, Cert and Key
	Pump ptyio.Config   `json:"pump"` // default per-session bounds

	MaxSessions    int           `json:"max_sessions"`     // running at once
	MaxPairTimeout time.Duration `json:"max_pair_timeout"` // the most a request may ask for
	MaxIdleTimeout time.Duration `json:"max_idle_timeout"`
	MaxMaxDuration time.Duration `json:"max_max_duration"`
	KeepEnded      time.Duration `json:"-"` // how long ended sessions stay queryable
	KeepEndedCount int           `json:"-"` // and how many at most
	// DefaultPids is the pids limit of a host session or sandbox whose
	// request names none ("limits": {"pids": 0} asks for none); 0: none.
	DefaultPids int64 `json:"default_pids"`
	// SetupTimeout bounds a session's setup once paired (see
	// agent.Spec.SetupTimeout).
	SetupTimeout time.Duration `json:"setup_timeout"`
	// Keepalive and PeerTimeout bound protocol v2 sessions' links (see
	// agent.Spec): a ping every Keepalive, a client not heard for
	// PeerTimeout is gone. Zero: the agent's defaults; negative: off.
	Keepalive   time.Duration `json:"keepalive"`
	PeerTimeout time.Duration `json:"peer_timeout"`

	Access Access `json:"-"` // who may call the API, and what they may ask for

	// Worker is the binary started as each session's worker; empty: the
	// daemon's own (the inode it runs, even after an upgrade replaced the
	// file: a daemon starts workers of its own version).
	Worker string `json:"-"`
	// Spares is how many workers wait, started, for a session's order:
	// the exec and the Go runtime's start are then off the path to a
	// session's first byte.
	Spares int `json:"-"`

	// FaultLabel, for tests, names a request label whose value is a fault
	// point ("started", "input", "output", or "worker" for a crash of the
	// worker itself) where that session's worker panics. Empty (always,
	// in production): off.
	FaultLabel string `json:"fault_label,omitempty"`

	Version string `json:"-"`
	// Stderr takes the daemon's text and JSON logs; nil: os.Stderr.
	// Workers write theirs to it when it is a file, else to os.Stderr (a
	// worker outlives the daemon, and with it anything the daemon copies).
	Stderr io.Writer `json:"-"`
	// Journal sends journald entries (nil: journal.Send); for tests.
	Journal JournalSender `json:"-"`

	onChange func(active int) // the daemon's systemd status
}

func (c Config) stderr() io.Writer {
	if c.Stderr == nil {
		return os.Stderr
	}
	return c.Stderr
}

func (c Config) workerStderr() *os.File {
	if f, ok := c.Stderr.(*os.File); ok {
		return f
	}
	return os.Stderr
}

// DefaultConfig is the daemon's configuration with every default filled
// in; serve's flags start from it.
func DefaultConfig() Config {
	return Config{
		Control:        DefaultControl,
		MetricsListen:  "127.0.0.1:9464",
		LogFormat:      "auto",
		StateDir:       DefaultStateDir,
		OnSIGTERM:      OnSIGTERMHandover,
		ShutdownGrace:  10 * time.Minute,
		Dial:           tlsdial.DefaultConfig(),
		Pump:           ptyio.Config{IdleTimeout: ptyio.DefaultIdleTimeout, StallTimeout: ptyio.DefaultStallTimeout, MaxDuration: ptyio.DefaultMaxDuration, KillGrace: ptyio.DefaultKillGrace},
		MaxSessions:    1000,
		MaxPairTimeout: 10 * time.Minute,
		MaxIdleTimeout: 24 * time.Hour,
		MaxMaxDuration: 7 * 24 * time.Hour,
		KeepEnded:      time.Hour,
		KeepEndedCount: 10000,
		DefaultPids:    container.DefaultPidsLimit(),
		SetupTimeout:   container.DefaultSetupTimeout,
		Keepalive:      agent.DefaultKeepalive,
		PeerTimeout:    agent.DefaultPeerTimeout,
		Access:         DefaultAccess(),
		Spares:         2,
		Version:        "dev",
	}
}

// ConfigError is a setting that cannot work; Field names it as serve's
// flag does.
type ConfigError struct{ Field, Problem string }

func (e *ConfigError) Error() string { return e.Field + ": " + e.Problem }

// Validate reports the first setting that cannot work, naming its flag.
func (c Config) Validate() error {
	bad := func(field, format string, a ...any) error {
		return &ConfigError{field, fmt.Sprintf(format, a...)}
	}
	if err := c.Dial.Validate(); err != nil {
		return bad("--dial", "%v", err)
	}
	if err := c.Pump.Validate(); err != nil {
		return bad("--pump", "%v", err)
	}
	if c.Dial.Plain && (c.CA != "" || c.Cert != "" || c.Key != "") {
		return bad("--plain", "conflicts with --ca, --cert and --key (no TLS is spoken)")
	}
	if (c.Cert == "") != (c.Key == "") {
		return bad("--cert", "give both --cert and --key, or neither")
	}
	if !c.Dial.Plain {
		if _, err := tlsdial.LoadTLS(c.CA, c.Cert, c.Key); err != nil {
			return bad("--ca", "%v", err)
		}
	}
	if c.MaxSessions < 1 {
		return bad("--max-sessions", "%d: want 1 or more", c.MaxSessions)
	}
	for _, d := range []struct {
		name string
		v    time.Duration
	}{{"--max-pair-timeout", c.MaxPairTimeout}, {"--max-idle-timeout", c.MaxIdleTimeout}, {"--max-max-duration", c.MaxMaxDuration},
		{"--keep-ended", c.KeepEnded}, {"--setup-timeout", c.SetupTimeout}} {
		if d.v <= 0 {
			return bad(d.name, "%v: want a positive duration", d.v)
		}
	}
	if c.Keepalive > 0 && c.PeerTimeout > 0 && c.PeerTimeout <= c.Keepalive {
		return bad("--peer-timeout", "%v must be longer than --keepalive (%v): a peer would be lost between two pings", c.PeerTimeout, c.Keepalive)
	}
	if c.ShutdownGrace < 0 {
		return bad("--shutdown-grace", "%v: want 0 or more", c.ShutdownGrace)
	}
	if c.KeepEndedCount < 1 {
		return bad("keep-ended-count", "%d: want 1 or more", c.KeepEndedCount)
	}
	if c.DefaultPids < 0 {
		return bad("--limit-pids", "%d: want 0 (none) or more", c.DefaultPids)
	}
	if c.OnSIGTERM != OnSIGTERMHandover && c.OnSIGTERM != OnSIGTERMDrain {
		return bad("--on-sigterm", "%q: want %s or %s", c.OnSIGTERM, OnSIGTERMHandover, OnSIGTERMDrain)
	}
	if !filepath.IsAbs(c.StateDir) {
		return bad("--state-dir", "%q: want an absolute path", c.StateDir)
	}
	if c.Spares < 0 || c.Spares > 64 {
		return bad("--spare-workers", "%d: want 0 to 64", c.Spares)
	}
	for _, d := range c.Access.RootfsUnder {
		if !filepath.IsAbs(d) {
			return bad("--rootfs-under", "%q: want an absolute path", d)
		}
	}
	if _, err := NewLogger(c.LogFormat, io.Discard, nil); err != nil {
		return bad("--log-format", "%v", err)
	}
	return nil
}

// NewLogger makes the log for format (journald, text, json, or auto:
// journald when stderr is the journal); send is the journald sender (nil:
// journal.Send).
func NewLogger(format string, stderr io.Writer, send JournalSender) (*slog.Logger, error) {
	if stderr == nil {
		stderr = io.Discard
	}
	switch format {
	case "auto":
		if ok, _ := journal.StderrIsJournalStream(); ok {
			return slog.New(NewJournalHandler(send, nil)), nil
		}
		return slog.New(slog.NewTextHandler(stderr, nil)), nil
	case "journald":
		return slog.New(NewJournalHandler(send, nil)), nil
	case "text":
		return slog.New(slog.NewTextHandler(stderr, nil)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(stderr, nil)), nil
	}
	return nil, fmt.Errorf("%q: want journald, text, json or auto", format)
}

// sessionsDir is where the records are.
func (c Config) sessionsDir() string { return filepath.Join(c.StateDir, "sessions") }

var errWorkerLost = errors.New("the session's worker ended without a result (killed: out of memory or SIGKILL, or crashed); its command was ended")
