package container

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"runtime"
	"syscall"

	"github.com/attach-agent/attach-agent/ptyio"
	"golang.org/x/sys/unix"
)

// helperArg, as the first argument, makes the agent's binary the join
// helper (see Main and joinLaunch).
const helperArg = "__join-exec"

// helperNS is a namespace the helper enters: the file the agent opened,
// as the helper's fd.
type helperNS struct {
	Name string
	Flag int
	FD   int
}

// helperConfig is what the agent tells the join helper through fd 3.
type helperConfig struct {
	Argv []string
	Env  []string
	Dir  string
	NS   []helperNS // in joinOrder
	// RootFD is the container's root directory, opened.
	RootFD int
	// Cred is who the command runs as; nil: root (inside).
	Cred *syscall.Credential
	// Confine is the target's confinement; Root says whether the command
	// runs as root.
	Confine confinement
	Root    bool
}

// startHelper starts cmd as the helper (path and args name it, or what
// starts it: nsenter), handing it cmd's own command through the config
// pipe and the extra files from fd 5. It returns once the helper reports
// that the command started, or with its failure as a spawn error.
func startHelper(sc setupCtx, cmd *exec.Cmd, hc helperConfig, path string, args []string, extra []*os.File) error {
	hc.Argv, hc.Env, hc.Dir = cmd.Args, cmd.Env, cmd.Dir
	name := cmd.Args[0]
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

// runJoinHelper is the helper. On its one locked thread it enters the
// container's namespaces and root, confines the thread as the target is
// confined, and forks the command there (so the command is born inside,
// in the container's PID namespace, with all of it); then it stays the
// command's parent, in the host's PID namespace, and exits with its
// status. Signals for the session reach the command through its process
// group, which it shares with the helper.
func runJoinHelper() int {
	runtime.LockOSThread()
	// Whatever the agent or nsenter passed, the command holds none of it.
	_ = unix.CloseRange(3, ^uint(0), unix.CLOSE_RANGE_CLOEXEC)
	_ = unix.Prctl(unix.PR_SET_DUMPABLE, 0, 0, 0, 0) // our /proc files are root's alone
	status := os.NewFile(4, "status")
	report := func(st initStatus) int {
		_ = json.NewEncoder(status).Encode(st) // the agent reads it, or has gone
		_ = status.Close()
		return st.Code
	}
	fail := func(code int, err error) int { return report(initStatus{Code: code, Err: err.Error()}) }
	var hc helperConfig
	if err := json.NewDecoder(os.NewFile(3, "config")).Decode(&hc); err != nil {
		return fail(125, fmt.Errorf("join helper: read config: %w", err))
	}
	// Caught, not ignored (an ignored signal stays ignored in the command):
	// each reaches the command through the group already.
	signal.Notify(make(chan os.Signal, 1), syscall.SIGHUP, syscall.SIGINT, syscall.SIGQUIT, syscall.SIGTERM,
		syscall.SIGUSR1, syscall.SIGUSR2, syscall.SIGWINCH)
	child, err := enterAndStart(hc)
	if err != nil {
		code := 125
		var se *ptyio.SpawnError
		if errors.As(err, &se) {
			code, err = se.Code, se.Err // the agent names the command itself
		}
		return fail(code, err)
	}
	report(initStatus{OK: true})
	for {
		var ws unix.WaitStatus
		_, err := unix.Wait4(child, &ws, 0, nil)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		switch {
		case err != nil:
			return 125
		case ws.Signaled():
			return 128 + int(ws.Signal())
		case ws.Exited():
			return ws.ExitStatus()
		}
	}
}

// enterAndStart does the helper's work on its locked thread and returns
// the command's pid.
func enterAndStart(hc helperConfig) (int, error) {
	// While /proc is still the host's (the thread's own attr files).
	if err := hc.Confine.setLabel(); err != nil {
		return 0, err
	}
	// The thread's root and cwd are the process's until this; setns into a
	// mount namespace also requires it.
	if err := unix.Unshare(unix.CLONE_FS); err != nil {
		return 0, fmt.Errorf("unshare fs: %w", err)
	}
	for _, ns := range hc.NS {
		if err := unix.Setns(ns.FD, ns.Flag); err != nil {
			return 0, fmt.Errorf("enter the container's %s namespace: %w", ns.Name, err)
		}
	}
	if err := unix.Fchdir(hc.RootFD); err != nil {
		return 0, fmt.Errorf("enter the container's root: %w", err)
	}
	if err := unix.Chroot("."); err != nil {
		return 0, fmt.Errorf("chroot: %w", err)
	}
	if err := unix.Chdir("/"); err != nil {
		return 0, err
	}
	if len(hc.Argv) == 0 {
		return 0, &ptyio.SpawnError{Name: "''", Code: 127, Err: errors.New("empty command")}
	}
	path, err := ptyio.Resolve(hc.Argv[0], hc.Env, hc.Dir)
	if err != nil {
		return 0, err
	}
	if err := hc.Confine.apply(hc.Root); err != nil {
		return 0, fmt.Errorf("confine as the container: %w", err)
	}
	p, err := os.StartProcess(path, hc.Argv, &os.ProcAttr{
		Dir: hc.Dir, Env: hc.Env, Files: []*os.File{os.Stdin, os.Stdout, os.Stderr},
		Sys: &syscall.SysProcAttr{Credential: hc.Cred}, // the helper's session and terminal
	})
	if err != nil {
		return 0, &ptyio.SpawnError{Name: hc.Argv[0], Code: 126, Err: err}
	}
	return p.Pid, nil
}
