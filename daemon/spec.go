package daemon

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/attach-agent/attach-agent/agent"
	"github.com/attach-agent/attach-agent/container"
	"github.com/attach-agent/attach-agent/ptyio"
	"github.com/attach-agent/attach-agent/tlsdial"
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

// Labels are carried into every log line of a session and its record:
// bounded so that neither grows without end.
const (
	maxLabels   = 64
	maxLabelLen = 1024
)

// specFor turns a request into a session spec under the operator's
// bounds in cfg, or says which field is wrong. The daemon calls it to
// answer the request, the worker to run it: one reading of a request.
func specFor(cfg Config, req Request) (agent.Spec, error) {
	var sp agent.Spec
	bad := func(field, format string, a ...any) (agent.Spec, error) {
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
		ctr.Limits.Pids = cfg.DefaultPids
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
	pc := cfg.Pump
	pc.EOFByte = !tty
	dial := cfg.Dial
	for _, d := range []struct {
		name  string
		in    string
		limit time.Duration
		dst   *time.Duration
	}{
		{"pair_timeout", req.PairTimeout, cfg.MaxPairTimeout, &dial.PairTimeout},
		{"idle_timeout", req.IdleTimeout, cfg.MaxIdleTimeout, &pc.IdleTimeout},
		{"max_duration", req.MaxDuration, cfg.MaxMaxDuration, &pc.MaxDuration},
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
	if len(req.Labels) > maxLabels {
		return bad("labels", "%d labels: at most %d", len(req.Labels), maxLabels)
	}
	for k, v := range req.Labels {
		if len(k) > maxLabelLen || len(v) > maxLabelLen {
			return bad("labels", "key %.40q: keys and values of at most %d bytes", k, maxLabelLen)
		}
		if k == "" || strings.ContainsFunc(k, func(r rune) bool {
			return !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '_')
		}) {
			return bad("labels", "key %q: use letters, digits and '_'", k)
		}
	}
	return agent.Spec{
		URL: u, Dial: dial, Pump: pc, ExitStatusMarker: req.ExitStatusMarker, Labels: req.Labels,
		Keepalive: cfg.Keepalive, PeerTimeout: cfg.PeerTimeout,
		User: req.User, Container: ctr, SetupTimeout: cfg.SetupTimeout,
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
