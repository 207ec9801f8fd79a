package container

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"syscall"

	"github.com/attach-agent/attach-agent/ptyio"
	"golang.org/x/sys/unix"
)

// helperArg, as the first argument, makes the agent's binary the join
// helper (see Main): the last step of a joined command's start, inside
// the container, for what the agent's forking thread cannot do itself.
const helperArg = "__join-exec"

// helperConfig is what the agent tells the join helper through fd 3.
type helperConfig struct {
	Argv []string
	Env  []string
	Dir  string
	// Path is the program, already resolved inside; empty: the helper
	// resolves Argv[0] in Env's PATH (it runs inside the root).
	Path string
	// Cred, when set, is who the helper becomes before it execs.
	Cred *syscall.Credential
	// Confine, when set, is applied by the helper (its bounding set is
	// full again after entering a user namespace); Root says whether the
	// command runs as root.
	Confine *confinement
	Root    bool
	// Seccomp installs the default filter right before the exec.
	Seccomp bool
}

// startHelper starts cmd, which runs the helper (path and args name it
// and whatever starts it, e.g. nsenter), and hands it cmd's own command
// through the config pipe; extra files follow the pipes from fd 5. It
// returns once the helper reports that it is about to exec the command,
// or with the helper's failure as a spawn error.
func startHelper(sc setupCtx, cmd *exec.Cmd, hc helperConfig, path string, args []string, extra []*os.File) error {
	hc.Argv, hc.Env, hc.Dir = cmd.Args, cmd.Env, cmd.Dir
	name := cmd.Args[0]
	if hc.Path == "" && len(hc.Argv) == 0 {
		return &ptyio.SpawnError{Name: "''", Code: 127, Err: errors.New("empty command")}
	}
	cfgR, cfgW, err := os.Pipe()
	if err != nil {
		return err
	}
	defer func() { _ = cfgW.Close() }() // best effort
	statR, statW, err := os.Pipe()
	if err != nil {
		_ = cfgR.Close()
		return err
	}
	defer func() { _ = statR.Close() }() // best effort
	cmd.Path, cmd.Args = path, args
	cmd.Env = []string{} // nothing of the request reaches nsenter or the helper's start
	cmd.Dir = ""
	cmd.ExtraFiles = append([]*os.File{cfgR, statW}, extra...)
	err = cmd.Start()
	_, _ = cfgR.Close(), statW.Close() // the helper's ends
	if err != nil {
		if errors.Is(err, os.ErrNotExist) && path == "/proc/self/exe" {
			return fmt.Errorf("start the join helper: %w: the container needs /proc mounted, and a dynamically linked agent its libraries inside (build it with CGO_ENABLED=0)", err)
		}
		return fmt.Errorf("start the join helper: %w", err)
	}
	if err := json.NewEncoder(cfgW).Encode(hc); err != nil {
		return abortInit(cmd, fmt.Errorf("configure the join helper: %w", err))
	}
	_ = cfgW.Close()
	st, err := readStatus(sc, statR, "join helper")
	if err != nil {
		return abortInit(cmd, err)
	}
	if !st.OK {
		_ = cmd.Wait() // the helper exits after reporting
		return &ptyio.SpawnError{Name: name, Code: st.Code, Err: errors.New(st.Err)}
	}
	return nil
}

// runJoinHelper is the helper: inside the container's namespaces and
// root, as root there, it becomes the user, confines itself, reports that
// it is ready, and execs the command. Everything per thread (bounding set,
// no_new_privs, seccomp) is done on the one thread that execs.
func runJoinHelper() int {
	runtime.LockOSThread()
	// Whatever nsenter or the agent passed, the command holds none of it.
	_ = unix.CloseRange(3, ^uint(0), unix.CLOSE_RANGE_CLOEXEC)
	status := os.NewFile(4, "status")
	fail := func(code int, err error) int {
		_ = json.NewEncoder(status).Encode(initStatus{Code: code, Err: err.Error()}) // the agent reads it, or has gone
		return code
	}
	var hc helperConfig
	if err := json.NewDecoder(os.NewFile(3, "config")).Decode(&hc); err != nil {
		return fail(125, fmt.Errorf("join helper: read config: %w", err))
	}
	_ = unix.Prctl(unix.PR_SET_DUMPABLE, 0, 0, 0, 0) // no tenant process may open our /proc files
	if err := unix.Chdir("/"); err != nil {
		return fail(125, err)
	}
	path := hc.Path
	if path == "" {
		var err error
		if path, err = ptyio.Resolve(hc.Argv[0], hc.Env, hc.Dir); err != nil {
			var se *ptyio.SpawnError
			if errors.As(err, &se) {
				return fail(se.Code, se.Err)
			}
			return fail(125, err)
		}
	}
	if hc.Dir != "" {
		if err := unix.Chdir(hc.Dir); err != nil {
			return fail(125, fmt.Errorf("working directory: %w", err))
		}
	}
	if hc.Confine != nil {
		// The bounding set first, while we still have CAP_SETPCAP.
		if err := hc.Confine.apply(hc.Root, false); err != nil {
			return fail(125, fmt.Errorf("confine as the container: %w", err))
		}
	}
	if c := hc.Cred; c != nil {
		if err := setCred(c); err != nil {
			return fail(125, err)
		}
	}
	if hc.Seccomp {
		if err := installFilter(); err != nil {
			return fail(125, err)
		}
	}
	// Ready: the status pipe closes with the exec (close-on-exec); the
	// agent does not wait for that, since nsenter keeps a copy open.
	if err := json.NewEncoder(status).Encode(initStatus{OK: true}); err != nil {
		return 125
	}
	err := syscall.Exec(path, hc.Argv, hc.Env)
	fmt.Fprintf(os.Stderr, "attach-agent: exec %s: %v\r\n", hc.Argv[0], err)
	if errors.Is(err, syscall.ENOENT) {
		return 127
	}
	return 126
}

// setCred switches the whole process to c (Go applies set*id to every
// thread).
func setCred(c *syscall.Credential) error {
	groups := make([]int, len(c.Groups))
	for i, g := range c.Groups {
		groups[i] = int(g)
	}
	if err := syscall.Setgroups(groups); err != nil {
		return fmt.Errorf("setgroups: %w", err)
	}
	if err := syscall.Setresgid(int(c.Gid), int(c.Gid), int(c.Gid)); err != nil {
		return fmt.Errorf("setgid %d: %w", c.Gid, err)
	}
	if err := syscall.Setresuid(int(c.Uid), int(c.Uid), int(c.Uid)); err != nil {
		return fmt.Errorf("setuid %d: %w", c.Uid, err)
	}
	return nil
}
