package container

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"syscall"
	"time"

	"github.com/attach-agent/attach-agent/ptyio"
)

// initArg, as the first argument, makes the agent's binary the sandbox
// init (see Main).
const initArg = "__sandbox-init"

// DefaultSetupTimeout bounds a session's setup where the tenant's image
// or container could hold it up: the user lookup, a sandbox init's setup,
// a join helper's, up to the command's start. Past it the session fails
// with spawn_failed (125) and the reason.
const DefaultSetupTimeout = 10 * time.Second

// setupCtx is a session's context and setup timeout, for the steps of a
// launch that wait on the tenant.
type setupCtx struct {
	ctx     context.Context
	timeout time.Duration
}

// initConfig is what the agent tells its init through fd 3.
type initConfig struct {
	Argv       []string
	Env        []string
	Dir        string
	Rootfs     string
	Hostname   string
	NoNet      bool
	TTY        bool
	Limits     Limits
	Privileged bool
	Scratch    string // with overlay: where the writable layer goes
	// OverlaySize bounds the writable layer's tmpfs, in bytes.
	OverlaySize int64
	Cred        *syscall.Credential
}

// initStatus is the init's one report through fd 4: the command started,
// or why not, with the shell's code (127 not found, 126 not executable,
// 125 otherwise).
type initStatus struct {
	OK   bool
	Code int
	Err  string
}

// sandboxLaunch starts the agent's own binary as the init of new
// namespaces; the init sets up the root, /proc and /dev and starts the
// command as its child. The command's tty (or pipes) go to the init as its
// stdio; the init gives them to the command, which takes the tty as its
// controlling terminal (the init must not: a non-root command could not
// take it over).
//
// The config pipe stays open as the init's lifeline: the agent closes it
// in release, after the session, and the kernel closes it if the agent
// dies; either way the init reads EOF and takes the sandbox down with it,
// so an agent that crashed leaves no sandbox running unattended.
func sandboxLaunch(sc setupCtx, s Spec, cg *cgroup, scratch string, lifeline **os.File) func(*exec.Cmd) error {
	return func(cmd *exec.Cmd) error {
		attr := cmd.SysProcAttr
		cfg := initConfig{
			Argv: cmd.Args, Env: cmd.Env, Dir: cmd.Dir, Rootfs: s.Rootfs, Hostname: s.Hostname,
			NoNet: s.Network == NetworkNone, TTY: attr.Setctty, Limits: s.Limits, Cred: attr.Credential,
			Privileged: s.Privileged, Scratch: scratch, OverlaySize: s.overlaySize(),
		}
		if cfg.Hostname == "" {
			cfg.Hostname = DefaultHostname
		}
		cfgR, cfgW, err := os.Pipe()
		if err != nil {
			return err
		}
		keep := false
		defer func() {
			if !keep {
				_ = cfgW.Close() // best effort
			}
		}()
		statR, statW, err := os.Pipe()
		if err != nil {
			_ = cfgR.Close()
			return err
		}
		defer func() { _ = statR.Close() }() // best effort

		cmd.Path = "/proc/self/exe" // the running binary, even if replaced on disk since
		cmd.Args = []string{"attach-agent", initArg}
		cmd.Env = []string{}
		cmd.Dir = "" // the command's, inside; the init starts where the agent is
		cmd.ExtraFiles = []*os.File{cfgR, statW}
		attr.Credential = nil // the init needs root to mount; the command gets the credential
		attr.Setctty = false
		attr.Cloneflags |= syscall.CLONE_NEWPID | syscall.CLONE_NEWNS | syscall.CLONE_NEWUTS | syscall.CLONE_NEWIPC
		if cfg.NoNet {
			attr.Cloneflags |= syscall.CLONE_NEWNET
		}
		if cg != nil && cg.v2fd >= 0 {
			// Born there (clone3's CLONE_INTO_CGROUP): a move after the
			// start costs the kernel an RCU grace period, 5-15 ms here.
			attr.UseCgroupFD, attr.CgroupFD = true, cg.v2fd
		}
		err = cmd.Start()
		_, _ = cfgR.Close(), statW.Close() // the init's ends
		if errors.Is(err, syscall.EPERM) {
			return fmt.Errorf("start sandbox init: %w: new namespaces need root (CAP_SYS_ADMIN)", err)
		}
		if err != nil {
			return fmt.Errorf("start sandbox init: %w", err)
		}
		// Into the cgroup before the init reads its config, so the command
		// and all it forks are counted.
		if cg != nil {
			// The v1 groups (limits a v1 hierarchy gives) by a move.
			if err := cg.addV1(cmd.Process.Pid); err != nil {
				return abortInit(cmd, err)
			}
		}
		if err := json.NewEncoder(cfgW).Encode(cfg); err != nil {
			return abortInit(cmd, fmt.Errorf("configure sandbox init: %w", err))
		}
		st, err := readStatus(sc, statR, "sandbox init")
		if err != nil {
			return abortInit(cmd, err)
		}
		if !st.OK {
			_ = cmd.Wait() // the init exits after reporting
			return &ptyio.SpawnError{Name: cfg.Argv[0], Code: st.Code, Err: errors.New(st.Err)}
		}
		keep, *lifeline = true, cfgW
		return nil
	}
}

// readStatus reads the one report of an init or helper (what), bounded
// by the setup timeout and ended early by ctx (a session deleted, the
// daemon shutting down): an image can make setup hang (a FUSE root, a
// lookup that never returns), and the slot must not stay taken.
func readStatus(sc setupCtx, r *os.File, what string) (initStatus, error) {
	ctx := sc.ctx
	var st initStatus
	deadline := time.Now().Add(sc.timeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	_ = r.SetReadDeadline(deadline) // os.Pipe's ends are on the poller
	stop := context.AfterFunc(ctx, func() { _ = r.SetReadDeadline(time.Now()) })
	defer stop()
	// One JSON object: not up to EOF, which a stray copy of the pipe
	// could hold off.
	err := json.NewDecoder(io.LimitReader(r, 64<<10)).Decode(&st)
	switch {
	case errors.Is(err, os.ErrDeadlineExceeded) && ctx.Err() != nil:
		return st, fmt.Errorf("%s: setup cancelled: %w", what, context.Cause(ctx))
	case errors.Is(err, os.ErrDeadlineExceeded):
		return st, fmt.Errorf("%s: setup took longer than its timeout: the image or container held it up", what)
	case errors.Is(err, io.EOF):
		return st, fmt.Errorf("%s: exited without a report", what)
	case err != nil:
		return st, fmt.Errorf("%s: report: %w", what, err)
	}
	return st, nil
}

// abortInit kills and reaps an init that cannot go on: it is PID 1 of its
// namespace, so everything in there goes with it.
func abortInit(cmd *exec.Cmd, err error) error {
	_ = cmd.Process.Kill()
	_ = cmd.Wait()
	return err
}
