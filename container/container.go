// Package container places a session's command where a one-off dyno's
// command belongs: as the dyno's user, resolved against the container's own
// passwd and group files, and either inside the namespaces of a running
// process (join, as `docker exec` does) or in new namespaces rooted at a
// directory under the agent re-executed as a small init (sandbox). It plugs
// into ptyio's Launch hook and knows nothing of relays or sessions.
package container

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/attach-agent/attach-agent/ptyio"
)

// Network modes of a sandbox.
const (
	NetworkHost = "host" // the host's network namespace (the default)
	NetworkNone = "none" // a new network namespace with only loopback, up
)

// DefaultHostname is a sandbox's hostname when none is given.
const DefaultHostname = "sandbox"

// Spec says where a command runs. The zero value is the host, as the
// agent. PID and Rootfs are exclusive.
type Spec struct {
	// PID joins the mount, UTS, IPC, network, PID and cgroup namespaces and
	// the root directory of this running process.
	PID int `json:"pid,omitempty"`

	// Rootfs starts the command in new PID, mount, UTS and IPC namespaces
	// rooted at this directory, with a fresh /proc and /dev, under an init.
	Rootfs string `json:"rootfs,omitempty"`
	// Hostname of the sandbox; empty: DefaultHostname.
	Hostname string `json:"hostname,omitempty"`
	// Network is NetworkHost (empty means that) or NetworkNone.
	Network string `json:"network,omitempty"`
	// Limits apply to the sandbox.
	Limits Limits `json:"limits,omitzero"`
	// Overlay leaves Rootfs untouched: the sandbox sees it under a
	// writable layer in memory that goes away with the sandbox.
	Overlay bool `json:"overlay,omitempty"`
	// Privileged keeps every capability for a command run as root in the
	// sandbox; by default it keeps only what container runtimes give
	// (no mounting, no hostname, no module loading, no tracing).
	Privileged bool `json:"privileged,omitempty"`
}

// Limits are a sandbox's resource limits. Zero leaves each unlimited (as
// the agent's own, for rlimits).
type Limits struct {
	NoFile uint64 `json:"nofile,omitempty"` // RLIMIT_NOFILE, open files per process
	NProc  uint64 `json:"nproc,omitempty"`  // RLIMIT_NPROC, processes per user (not enforced on root)
	Pids   int64  `json:"pids,omitempty"`   // cgroup pids limit: tasks in the whole sandbox
	Memory int64  `json:"memory_bytes,omitempty"`
}

// IsZero reports whether the command runs on the host.
func (s Spec) IsZero() bool { return s == Spec{} }

// Validate checks the spec's shape (not whether the process or directory
// is there: that is checked when the session starts).
func (s Spec) Validate() error {
	if s.PID != 0 && s.Rootfs != "" {
		return errors.New("container: give pid (join a running container) or rootfs (a new sandbox), not both")
	}
	if s.PID < 0 {
		return fmt.Errorf("container: pid %d: want a process id above 0", s.PID)
	}
	if s.Rootfs == "" {
		if s.Hostname != "" || s.Network != "" || s.Limits != (Limits{}) || s.Privileged || s.Overlay {
			return errors.New("container: hostname, network, limits, overlay and privileged are for a sandbox: give rootfs too")
		}
		return nil
	}
	if !filepath.IsAbs(s.Rootfs) {
		return fmt.Errorf("container: rootfs %q: want an absolute path", s.Rootfs)
	}
	if filepath.Clean(s.Rootfs) == "/" {
		return errors.New("container: rootfs /: a sandbox needs its own root directory")
	}
	if s.Overlay && strings.ContainsAny(s.Rootfs, ",:\\") {
		return fmt.Errorf("container: rootfs %q: with overlay, a path without ',', ':' or '\\' (overlayfs options cannot hold them)", s.Rootfs)
	}
	if err := validHostname(s.Hostname); err != nil {
		return err
	}
	switch s.Network {
	case "", NetworkHost, NetworkNone:
	default:
		return fmt.Errorf("container: network %q: want %q or %q", s.Network, NetworkHost, NetworkNone)
	}
	if s.Limits.Pids < 0 || s.Limits.Memory < 0 {
		return errors.New("container: limits: pids and memory_bytes must not be negative")
	}
	return nil
}

func validHostname(h string) error {
	if len(h) > 64 {
		return fmt.Errorf("container: hostname %q: longer than 64 bytes", h)
	}
	for _, c := range h {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '.') {
			return fmt.Errorf("container: hostname %q: only letters, digits, '-' and '.'", h)
		}
	}
	return nil
}

// Places are the values of Place, for metrics created up front.
var Places = []string{"host", "join", "sandbox"}

// Place is where the command runs, as a metric label: host, join or
// sandbox.
func (s Spec) Place() string {
	switch {
	case s.PID != 0:
		return "join"
	case s.Rootfs != "":
		return "sandbox"
	}
	return "host"
}

// String names the place for logs: "host", "pid N" or "rootfs DIR".
func (s Spec) String() string {
	switch s.Place() {
	case "join":
		return fmt.Sprintf("pid %d", s.PID)
	case "sandbox":
		return "rootfs " + s.Rootfs
	}
	return "host"
}

// Root is the directory, as the agent sees it, that the command will see
// as "/": where its passwd file and its program are looked up.
func (s Spec) Root() string {
	switch {
	case s.PID != 0:
		return fmt.Sprintf("/proc/%d/root", s.PID)
	case s.Rootfs != "":
		return s.Rootfs
	}
	return "/"
}

// Apply readies p to run as user (empty: as the agent) in the container:
// it resolves the user against the container's files, fills in the
// credentials, HOME, USER, LOGNAME and SHELL, a working directory (the
// user's home there, else "/", when none is given and the command does
// not run as the agent on the host), and a Launch that starts the command
// inside. On the host the command is born in a cgroup of the session's own
// where one can be made, so that what it leaves behind can be ended.
// The returned release is to be called once the command is gone (it ends
// such leftovers and removes the session's or sandbox's cgroup); it is
// never nil.
func Apply(s Spec, user string, p *ptyio.Spec) (release func(), err error) {
	release = func() {}
	if err := s.Validate(); err != nil {
		return release, err
	}
	if s.PID != 0 {
		if err := checkTarget(s.PID); err != nil {
			return release, err
		}
	}
	if s.Rootfs != "" {
		st, err := os.Stat(s.Rootfs)
		if err != nil {
			return release, fmt.Errorf("container: rootfs: %w", err)
		}
		if !st.IsDir() {
			return release, fmt.Errorf("container: rootfs %s: not a directory", s.Rootfs)
		}
	}
	root := s.Root()
	var home string
	if user != "" {
		id, err := ptyio.LookupUser(user, root)
		if err != nil {
			return release, err
		}
		attr := &syscall.SysProcAttr{}
		if p.SysProcAttr != nil {
			c := *p.SysProcAttr
			attr = &c
		}
		attr.Credential = id.Credential()
		p.SysProcAttr = attr
		p.Env = id.Env(p.Env)
		home = id.Home
	}
	if p.Dir == "" && (user != "" || !s.IsZero()) {
		p.Dir = "/"
		if home != "" {
			if st, err := os.Stat(filepath.Join(root, home)); err == nil && st.IsDir() {
				p.Dir = home
			}
		}
	}
	switch {
	case s.IsZero():
		if t := newTracker(); t != nil {
			p.Launch, release = t.launch, t.release
		}
	case s.PID != 0:
		cg, err := planCgroups(s.PID) // read now, off the spawn path
		if err != nil {
			return release, err
		}
		p.Launch, release = agentFailures(joinLaunch(s.PID, cg)), cg.close
	case s.Rootfs != "":
		cg, err := newCgroup(s.Limits)
		if err != nil {
			return release, err
		}
		scratch := ""
		if s.Overlay {
			// The mount point of the sandbox's writable layer: a tmpfs is
			// mounted on it inside the sandbox only, so the host sees an
			// empty directory, removed after.
			if scratch, err = os.MkdirTemp("", "attach-agent-sandbox-"); err != nil {
				cg.remove()
				return release, fmt.Errorf("container: overlay scratch: %w", err)
			}
		}
		var lifeline *os.File
		p.Launch = agentFailures(sandboxLaunch(s, cg, scratch, &lifeline))
		release = func() {
			if lifeline != nil {
				_ = lifeline.Close() // the init is gone by now; if not, this ends it
			}
			cg.remove()
			if scratch != "" {
				_ = os.Remove(scratch) // best effort: empty on the host
			}
		}
	}
	return release, nil
}

// agentFailures marks a launch's own failures (entering a namespace,
// starting the init) as the agent's, status 125, so that an EPERM from
// setns does not read as "not executable" (126); the command's own
// failures are already spawn errors with their codes.
func agentFailures(launch func(*exec.Cmd) error) func(*exec.Cmd) error {
	return func(cmd *exec.Cmd) error {
		name := cmd.Args[0]
		err := launch(cmd)
		var se *ptyio.SpawnError
		if err == nil || errors.As(err, &se) {
			return err
		}
		return &ptyio.SpawnError{Name: name, Code: 125, Err: err}
	}
}

// checkTarget says clearly when the process to join is not there or not
// ours to enter.
func checkTarget(pid int) error {
	_, err := os.Stat(fmt.Sprintf("/proc/%d/ns/mnt", pid))
	switch {
	case err == nil:
		return nil
	case errors.Is(err, os.ErrNotExist):
		return fmt.Errorf("container: pid %d: no such process: give the pid of a process in the running container", pid)
	case errors.Is(err, os.ErrPermission):
		return fmt.Errorf("container: pid %d: permission denied: joining a container's namespaces needs root (CAP_SYS_ADMIN)", pid)
	}
	return fmt.Errorf("container: pid %d: %w", pid, err)
}

// Shell is the shell for a command given as a string: bash where the
// container has it (Heroku runs commands with bash), else sh.
func (s Spec) Shell() string {
	for _, d := range []string{"bin", "usr/bin"} {
		if st, err := os.Stat(filepath.Join(s.Root(), d, "bash")); err == nil && !st.IsDir() {
			return "bash"
		}
	}
	return "sh"
}
