// Package container places a session's command where a one-off dyno's
// command belongs: as the dyno's user, resolved against the container's own
// passwd and group files, and either inside the namespaces of a running
// process (join, as `docker exec` does) or in new namespaces rooted at a
// directory under the agent re-executed as a small init (sandbox). It plugs
// into ptyio's Launch hook and knows nothing of relays or sessions.
package container

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/attach-agent/attach-agent/ptyio"
	"golang.org/x/sys/unix"
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
	// OverlaySize bounds that layer, in bytes; zero: the memory limit
	// when one is set, else DefaultOverlaySize.
	OverlaySize int64 `json:"overlay_size_bytes,omitempty"`
	// Privileged runs the sandbox as before any hardening: a command run
	// as root keeps every capability, and there is no seccomp filter, no
	// no_new_privs, no device allowlist, no masked or read-only /proc
	// paths and no nosuid/nodev. By default a sandbox holds its command
	// as a container runtime's defaults do (see init.go, seccomp.go).
	Privileged bool `json:"privileged,omitempty"`
}

// DefaultOverlaySize bounds an overlay's writable layer when no memory
// limit is set.
const DefaultOverlaySize = 1 << 30

func (s Spec) overlaySize() int64 {
	switch {
	case s.OverlaySize > 0:
		return s.OverlaySize
	case s.Limits.Memory > 0:
		return s.Limits.Memory
	}
	return DefaultOverlaySize
}

// Limits are a session's resource limits. Zero leaves each unlimited (as
// the agent's own, for rlimits). Pids and Memory hold host sessions too;
// NoFile and NProc are set by a sandbox's init.
type Limits struct {
	NoFile uint64 `json:"nofile,omitempty"` // RLIMIT_NOFILE, open files per process
	NProc  uint64 `json:"nproc,omitempty"`  // RLIMIT_NPROC, processes per user (not enforced on root)
	Pids   int64  `json:"pids,omitempty"`   // cgroup pids limit: tasks in the whole session or sandbox
	Memory int64  `json:"memory_bytes,omitempty"`
}

// DefaultPids is the pids limit a host session or sandbox gets when the
// operator sets none (the daemon's and attach's --limit-pids): enough for
// a parallel build, not for a fork bomb to take the host's pid space.
const DefaultPids = 4096

// DefaultPidsLimit is DefaultPids for an agent running as root, and 0 (no
// limit) for one that is not: it cannot make cgroups, and a limit that
// cannot be applied fails the session.
func DefaultPidsLimit() int64 {
	if os.Geteuid() != 0 {
		return 0
	}
	return DefaultPids
}

// IsZero reports whether the command runs on the host (limits aside).
func (s Spec) IsZero() bool { return s.PID == 0 && s.Rootfs == "" }

// Validate checks the spec's shape (not whether the process or directory
// is there: that is checked when the session starts).
func (s Spec) Validate() error {
	if s.PID != 0 && s.Rootfs != "" {
		return errors.New("container: give pid (join a running container) or rootfs (a new sandbox), not both")
	}
	if s.PID < 0 {
		return fmt.Errorf("container: pid %d: want a process id above 0", s.PID)
	}
	if s.Limits.Pids < 0 || s.Limits.Memory < 0 || s.OverlaySize < 0 {
		return errors.New("container: limits: pids, memory_bytes and overlay_size_bytes must not be negative")
	}
	if s.PID != 0 && s.Limits != (Limits{}) {
		return errors.New("container: limits are for a sandbox or a host session: a joined command is held by its container's own")
	}
	if s.Rootfs == "" {
		if s.Hostname != "" || s.Network != "" || s.Limits.NoFile != 0 || s.Limits.NProc != 0 || s.Privileged || s.Overlay || s.OverlaySize != 0 {
			return errors.New("container: hostname, network, limits.nofile, limits.nproc, overlay and privileged are for a sandbox: give rootfs too")
		}
		return nil
	}
	if !filepath.IsAbs(s.Rootfs) {
		return fmt.Errorf("container: rootfs %q: want an absolute path", s.Rootfs)
	}
	if filepath.Clean(s.Rootfs) == "/" {
		return errors.New("container: rootfs /: a sandbox needs its own root directory")
	}
	if strings.HasPrefix(filepath.Clean(s.Rootfs), "/proc/") {
		return fmt.Errorf("container: rootfs %s: a path in /proc is another process's root (give pid to join it)", s.Rootfs)
	}
	if s.OverlaySize != 0 && !s.Overlay {
		return errors.New("container: overlay_size_bytes is for an overlay: set overlay too")
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
// it resolves the user against the container's files (inside its root),
// fills in the credentials, HOME, USER, LOGNAME and SHELL, a working
// directory (the user's home there, else "/", when none is given and the
// command does not run as the agent on the host), and a Launch that
// starts the command inside. A join pins its target process now. Every
// command but a joined one is born in cgroups of the session's own, with
// its limits, so that what it leaves behind is ended with it. ctx ends
// any wait on the tenant during the launch (setup bounds each).
// The returned release is to be called once the command is gone: it kills
// what is left in the session's groups at once, removes them, and says
// what it could not; it is never nil.
func Apply(ctx context.Context, s Spec, user string, p *ptyio.Spec, setup time.Duration) (release func() error, err error) {
	release = func() error { return nil }
	if setup <= 0 {
		setup = DefaultSetupTimeout
	}
	sc := setupCtx{ctx: ctx, timeout: setup}
	if err := s.Validate(); err != nil {
		return release, err
	}
	var t *target
	if s.PID != 0 {
		if t, err = pinTarget(s.PID); err != nil {
			return release, err
		}
		t.setup = sc
		release = func() error { t.close(); return nil }
	}
	fail := func(err error) (func() error, error) {
		_ = release()
		return func() error { return nil }, err
	}
	if s.Rootfs != "" {
		if os.Geteuid() != 0 {
			// Said before its cgroups would fail less clearly.
			return fail(errors.New("container: a sandbox needs an agent running as root: new namespaces need root (CAP_SYS_ADMIN)"))
		}
		if err := checkRootfs(s.Rootfs); err != nil {
			return fail(err)
		}
	}
	root := s.Root()
	var home string
	if user != "" {
		id, err := LookupUser(user, root)
		if err != nil {
			return fail(err)
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
			if r, err := openRoot(root); err == nil {
				if r.isDir(home) {
					p.Dir = home
				}
				r.close()
			}
		}
	}
	switch {
	case s.IsZero():
		cg, err := newGroup(needs{kind: "session", limits: s.Limits})
		if err != nil {
			return fail(err)
		}
		if cg != nil {
			p.Launch = func(cmd *exec.Cmd) error {
				path, err := ptyio.Resolve(cmd.Args[0], cmd.Env, cmd.Dir)
				if err != nil {
					return err
				}
				cmd.Path = path
				return cg.start(cmd)
			}
			release = cg.release
		}
	case s.PID != 0:
		conf, err := readConfinement(s.PID)
		if err == nil {
			err = t.check() // what was read is the pinned process's
		}
		if err != nil {
			return fail(err)
		}
		cg, err := planCgroups(s.PID) // read now, off the spawn path
		if err != nil {
			return fail(err)
		}
		p.Launch = agentFailures(joinLaunch(t, conf, cg))
		release = func() error { cg.close(); t.close(); return nil }
	case s.Rootfs != "":
		cg, err := newGroup(needs{kind: "sandbox", limits: s.Limits, devices: !s.Privileged})
		if err != nil {
			return fail(err)
		}
		scratch := ""
		if s.Overlay {
			// The mount point of the sandbox's writable layer: a tmpfs is
			// mounted on it inside the sandbox only, so the host sees an
			// empty directory, removed after.
			if scratch, err = os.MkdirTemp("", "attach-agent-sandbox-"); err != nil {
				_ = cg.release()
				return fail(fmt.Errorf("container: overlay scratch: %w", err))
			}
		}
		var lifeline *os.File
		p.Launch = agentFailures(sandboxLaunch(sc, s, cg, scratch, &lifeline))
		release = func() error {
			if lifeline != nil {
				_ = lifeline.Close() // the init is gone by now; if not, this ends it
			}
			err := cg.release()
			if scratch != "" {
				_ = os.Remove(scratch) // best effort: empty on the host
			}
			return err
		}
	}
	return release, nil
}

// checkRootfs refuses a rootfs that is a directory the sandbox must not
// have: not a directory, or the host's own root under another name (a
// bind mount of /, a symlink to it), which would hand the host to the
// tenant.
func checkRootfs(dir string) error {
	fd, err := unix.Open(dir, unix.O_PATH|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("container: rootfs: %w", &os.PathError{Op: "open", Path: dir, Err: err})
	}
	defer func() { _ = unix.Close(fd) }() // best effort
	var st, host unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return fmt.Errorf("container: rootfs %s: %w", dir, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFDIR {
		return fmt.Errorf("container: rootfs %s: not a directory", dir)
	}
	if err := unix.Stat("/", &host); err == nil && st.Dev == host.Dev && st.Ino == host.Ino {
		return fmt.Errorf("container: rootfs %s is the host's root directory: give the sandbox an image of its own", dir)
	}
	return nil
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
	r, err := openRoot(s.Root())
	if err != nil {
		return "sh"
	}
	defer r.close()
	for _, p := range []string{"bin/bash", "usr/bin/bash"} {
		if st, err := r.stat(p); err == nil && st.Mode&unix.S_IFMT == unix.S_IFREG {
			return "bash"
		}
	}
	return "sh"
}
