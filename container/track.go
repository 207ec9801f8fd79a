package container

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"

	"github.com/attach-agent/attach-agent/ptyio"
)

// tracker is a host session's own cgroup, used for nothing but knowing
// its processes: the command is born in it, and whatever it leaves behind
// when the session ends (a daemon that called setsid and so escaped the
// process group the pump signals) is killed with the group. It needs no
// controller: any writable cgroup hierarchy does.
type tracker struct {
	cg   *cgroup
	fd   int    // v2: the group's directory, for CLONE_INTO_CGROUP; -1 for v1
	task string // v1: the group's "tasks" file
}

// newTracker makes a group for one session, in the unified hierarchy if
// one is mounted and writable, else in a v1 one. nil when there is none:
// tracking is a safety net, and a host without it still runs sessions
// (their process group is ended as always).
func newTracker() *tracker {
	mounts, err := cgroupMounts()
	if err != nil {
		return nil
	}
	name := groupName("session")
	for _, v2 := range []bool{true, false} {
		for _, m := range mounts {
			if m.v2 != v2 || m.root != "/" {
				continue
			}
			parent := filepath.Join(m.dir, cgroupParent)
			if err := os.MkdirAll(parent, 0o755); err != nil {
				continue
			}
			dir := filepath.Join(parent, name)
			if err := os.Mkdir(dir, 0o755); err != nil {
				continue
			}
			t := &tracker{cg: &cgroup{dirs: []string{dir}}, fd: -1}
			if !v2 {
				t.task = filepath.Join(dir, "tasks")
				return t
			}
			fd, err := syscall.Open(dir, syscall.O_RDONLY|syscall.O_DIRECTORY|syscall.O_CLOEXEC, 0)
			if err != nil {
				t.cg.remove()
				continue
			}
			t.fd = fd
			return t
		}
	}
	return nil
}

// launch starts cmd inside the group: with clone3's CLONE_INTO_CGROUP
// (v2), or from a thread that moved itself in first (v1), so nothing the
// command forks can start outside.
// The program is looked up here, as ptyio does for a command without a
// Launch; exec's own errors are left to ptyio to classify (126, 127).
func (t *tracker) launch(cmd *exec.Cmd) error {
	name := cmd.Args[0]
	path, err := ptyio.Resolve(name, cmd.Env, cmd.Dir)
	if err != nil {
		return err
	}
	cmd.Path = path
	if t.fd >= 0 {
		cmd.SysProcAttr.UseCgroupFD, cmd.SysProcAttr.CgroupFD = true, t.fd
		return cmd.Start()
	}
	return onFreshThread(func() error {
		if err := os.WriteFile(t.task, []byte(strconv.Itoa(syscall.Gettid())), 0); err != nil {
			return &ptyio.SpawnError{Name: name, Code: 125, Err: fmt.Errorf("session cgroup: %w", err)}
		}
		return cmd.Start()
	})
}

// release kills what is left in the group and removes it (bounded).
func (t *tracker) release() {
	if t.fd >= 0 {
		_ = syscall.Close(t.fd) // best effort
		t.fd = -1
	}
	t.cg.remove()
}
