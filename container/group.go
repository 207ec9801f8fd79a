package container

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/attach-agent/attach-agent/ptyio"
	"golang.org/x/sys/unix"
)

// cgroup is a session's or sandbox's own control groups: its command is
// born in them, its limits are written there, and at the end everything
// in them is killed at once and they are removed. It spans the unified
// (v2) hierarchy where one is mounted and writable, and the v1
// hierarchies that give what v2 does not (on hybrid hosts: pids, memory,
// devices, freezer). The zero value is no group.
type cgroup struct {
	dirs    []string // every group made, to kill and remove
	v2      string   // the v2 group, or ""
	v2fd    int      // v2: the group opened, for CLONE_INTO_CGROUP; -1 none
	freezer string   // a v1 freezer group, to stop everything before the kill
}

// needs is what a group must give; a need no hierarchy can meet fails
// with the limit's name: nothing asked for is silently dropped.
type needs struct {
	kind    string // "session" or "sandbox" (the group's name, see Sweep)
	limits  Limits
	devices bool // the sandbox's device allowlist
}

// controller is a limit and where it is written in each hierarchy.
type controller struct {
	name   string // pids, memory
	field  string // its name in Limits' JSON, for errors
	v2, v1 string // file names
	value  int64
}

// newGroup makes the groups for n. On a host with no writable hierarchy
// at all and nothing asked for, it returns nil: the session then runs as
// before, its process group ended as always.
func newGroup(n needs) (*cgroup, error) {
	mounts, err := cgroupMounts()
	if err != nil {
		mounts = nil
	}
	cg := &cgroup{v2fd: -1}
	name := groupName(n.kind)
	fail := func(err error) (*cgroup, error) {
		cg.release()
		return nil, err
	}
	// A host session's command may leave anything behind: its group is
	// what ends it (v2 where there is one). A sandbox's is ended by its
	// PID namespace (its init's exit kills it all): it needs a group only
	// for what its limits and devices need.
	var v2root string
	for _, m := range mounts {
		if m.v2 && m.root == "/" {
			v2root = m.dir
			break
		}
	}
	makeV2 := func() bool {
		if cg.v2 != "" || v2root == "" {
			return cg.v2 != ""
		}
		dir := filepath.Join(v2root, cgroupParent, name)
		if os.MkdirAll(filepath.Dir(dir), 0o755) != nil || os.Mkdir(dir, 0o755) != nil {
			v2root = ""
			return false
		}
		cg.v2 = dir
		cg.dirs = append(cg.dirs, dir)
		return true
	}
	if n.kind == "session" {
		makeV2()
	}
	var want []controller
	if n.limits.Pids > 0 {
		want = append(want, controller{"pids", "pids", "pids.max", "pids.max", n.limits.Pids})
	}
	if n.limits.Memory > 0 {
		want = append(want, controller{"memory", "memory_bytes", "memory.max", "memory.limit_in_bytes", n.limits.Memory})
	}
	for _, c := range want {
		if v2root != "" && hasController(v2root, c.name) && makeV2() {
			if err := enableV2(v2root, filepath.Dir(cg.v2), c.name); err != nil {
				return fail(fmt.Errorf("container: limits.%s: %w", c.field, err))
			}
			if err := writeLimit(cg.v2, c.v2, c.value); err != nil {
				return fail(fmt.Errorf("container: limits.%s: %w", c.field, err))
			}
			continue
		}
		dir, err := cg.v1(mounts, c.name, name)
		if errors.Is(err, errNoHierarchy) {
			err = fmt.Errorf("no %s controller in a cgroup hierarchy under %s: leave the limit out (0), or mount cgroup v2 with %s enabled",
				c.name, cgroupRoot, c.name)
		}
		if err == nil {
			err = writeLimit(dir, c.v1, c.value)
		}
		if err != nil {
			return fail(fmt.Errorf("container: limits.%s: %w", c.field, err))
		}
	}
	if n.devices {
		// The v2 device program where there is a writable v2 hierarchy
		// (one load and attach), else the v1 controller (a rule per
		// write, each ~1 ms: the controller waits out an RCU grace period).
		var err error
		if v2root != "" && makeV2() {
			err = denyDevicesV2(cg.v2)
		} else {
			var dir string
			dir, err = cg.v1(mounts, "devices", name)
			switch {
			case err == nil:
				err = denyDevicesV1(dir)
			case errors.Is(err, errNoHierarchy):
				err = fmt.Errorf("no devices cgroup (v1) or writable cgroup v2 under %s to hold the sandbox to its devices: mount one, or run it privileged", cgroupRoot)
			}
		}
		if err != nil {
			return fail(fmt.Errorf("container: device allowlist: %w", err))
		}
	}
	// Ending it all at once: cgroup.kill (v2, Linux 5.14) or, failing
	// that, the v1 freezer, so a fork loop cannot outrun the kill.
	if _, err := os.Stat(filepath.Join(cg.v2, "cgroup.kill")); n.kind == "session" && (cg.v2 == "" || err != nil) {
		if dir, err := cg.v1(mounts, "freezer", name); err == nil {
			cg.freezer = dir
		}
	}
	if len(cg.dirs) == 0 {
		if len(want) > 0 || n.devices {
			return fail(errors.New("container: no writable cgroup hierarchy")) // not reached: each need says so above
		}
		return nil, nil
	}
	if cg.v2 != "" {
		fd, err := syscall.Open(cg.v2, syscall.O_RDONLY|syscall.O_DIRECTORY|syscall.O_CLOEXEC, 0)
		if err != nil {
			return fail(fmt.Errorf("container: cgroup %s: %w", cg.v2, err))
		}
		cg.v2fd = fd
	}
	return cg, nil
}

var errNoHierarchy = errors.New("no such cgroup hierarchy")

// v1 makes the group in the v1 hierarchy of controller.
func (cg *cgroup) v1(mounts []cgroupMount, controller, name string) (string, error) {
	for _, m := range mounts {
		if m.v2 || !m.opts[controller] || m.root != "/" {
			continue
		}
		dir := filepath.Join(m.dir, cgroupParent, name)
		if err := os.MkdirAll(filepath.Dir(dir), 0o755); err != nil {
			return "", err
		}
		if err := os.Mkdir(dir, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
			return "", err
		}
		for _, d := range cg.dirs {
			if d == dir {
				return dir, nil // one hierarchy with several controllers
			}
		}
		cg.dirs = append(cg.dirs, dir)
		return dir, nil
	}
	return "", errNoHierarchy
}

func hasController(dir, name string) bool {
	b, err := os.ReadFile(filepath.Join(dir, "cgroup.controllers"))
	return err == nil && containsWord(string(b), name)
}

func containsWord(s, w string) bool {
	for _, f := range strings.Fields(s) {
		if f == w {
			return true
		}
	}
	return false
}

// enableV2 makes controller available to the groups under parent; in v2 a
// controller reaches a group only when every ancestor passes it down.
func enableV2(root, parent, name string) error {
	for _, dir := range []string{root, parent} {
		b, err := os.ReadFile(filepath.Join(dir, "cgroup.subtree_control"))
		if err == nil && containsWord(string(b), name) {
			continue
		}
		if err := os.WriteFile(filepath.Join(dir, "cgroup.subtree_control"), []byte("+"+name), 0); err != nil {
			return fmt.Errorf("enable %s in %s: %w", name, dir, err)
		}
	}
	return nil
}

func writeLimit(dir, file string, value int64) error {
	if err := os.WriteFile(filepath.Join(dir, file), []byte(strconv.FormatInt(value, 10)), 0); err != nil {
		return fmt.Errorf("set %s to %d: %w", file, value, err)
	}
	return nil
}

// addV1 moves pid (and so everything it will fork) into the v1 groups:
// for a process that waits to be placed (the sandbox's init reads its
// config only after) and was born in the v2 group.
func (cg *cgroup) addV1(pid int) error {
	for _, dir := range cg.dirs {
		if dir == cg.v2 {
			continue
		}
		if err := os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte(strconv.Itoa(pid)), 0); err != nil {
			return fmt.Errorf("container: cgroup %s: add the sandbox: %w", dir, err)
		}
	}
	return nil
}

// start starts cmd inside the groups, so that nothing it forks can start
// outside: the v2 group through clone3's CLONE_INTO_CGROUP, the v1 ones
// from a thread that moved itself in first (v1 moves single threads
// through "tasks") and is discarded after.
func (cg *cgroup) start(cmd *exec.Cmd) error {
	if cg.v2fd >= 0 {
		cmd.SysProcAttr.UseCgroupFD, cmd.SysProcAttr.CgroupFD = true, cg.v2fd
	}
	if len(cg.dirs) == 1 && cg.v2 != "" {
		return cmd.Start()
	}
	return onFreshThread(func() error {
		tid := []byte(strconv.Itoa(syscall.Gettid()))
		for _, dir := range cg.dirs {
			if dir == cg.v2 {
				continue
			}
			if err := os.WriteFile(filepath.Join(dir, "tasks"), tid, 0); err != nil {
				return &ptyio.SpawnError{Name: cmd.Args[0], Code: 125, Err: fmt.Errorf("session cgroup %s: %w", dir, err)}
			}
		}
		return cmd.Start()
	})
}

// killBound bounds the end of a group: freezing, the kill, and the wait
// for the kernel to let go of its processes.
const killBound = 5 * time.Second

// release kills everything left in the groups at once, waits (bounded)
// until they are empty and removes them. It reports what it could not
// end or remove; a nil group does nothing.
func (cg *cgroup) release() error {
	if cg == nil {
		return nil
	}
	if cg.v2fd >= 0 {
		_ = syscall.Close(cg.v2fd) // best effort
		cg.v2fd = -1
	}
	deadline := time.Now().Add(killBound)
	cg.kill(deadline)
	var errs []error
	for _, dir := range cg.dirs {
		if err := removeGroup(dir, deadline); err != nil {
			errs = append(errs, err)
		}
	}
	cg.dirs = nil
	return errors.Join(errs...)
}

// kill ends every process in the groups at once: cgroup.kill where the
// kernel has it; else the freezer stops them all (a fork loop then forks
// no more) before each is sent SIGKILL, and thaws them to die.
func (cg *cgroup) kill(deadline time.Time) {
	if cg.v2 != "" {
		if err := os.WriteFile(filepath.Join(cg.v2, "cgroup.kill"), []byte("1"), 0); err == nil {
			return
		}
		// Before Linux 5.14: freeze the group (5.2), kill, thaw.
		freeze := filepath.Join(cg.v2, "cgroup.freeze")
		if os.WriteFile(freeze, []byte("1"), 0) == nil {
			for time.Now().Before(deadline) {
				if b, err := os.ReadFile(filepath.Join(cg.v2, "cgroup.events")); err != nil || strings.Contains(string(b), "frozen 1") {
					break
				}
				time.Sleep(time.Millisecond) // bounded; cgroup.events could be polled, this is the rare path
			}
			killAll(cg.v2)
			_ = os.WriteFile(freeze, []byte("0"), 0)
		}
	}
	// Never freeze the agent's own thread that may still be in the group.
	if cg.freezer != "" && populated(cg.freezer) && !holdsAgent(cg.freezer) {
		state := filepath.Join(cg.freezer, "freezer.state")
		if os.WriteFile(state, []byte("FROZEN"), 0) == nil {
			for time.Now().Before(deadline) {
				if b, err := os.ReadFile(state); err != nil || strings.TrimSpace(string(b)) == "FROZEN" {
					break
				}
				time.Sleep(time.Millisecond) // the kernel gives no event for a finished freeze
			}
			killAll(cg.freezer)
			_ = os.WriteFile(state, []byte("THAWED"), 0) // they die as they thaw
		}
	}
	for _, dir := range cg.dirs {
		killAll(dir)
	}
}

// removeGroup removes dir once it is empty, killing what is still there
// while it waits (bounded). A directory that is not a busy cgroup (EACCES
// for a non-root agent, ENOTEMPTY for child groups) is left at once:
// waiting would not help.
func removeGroup(dir string, deadline time.Time) error {
	for {
		err := os.Remove(dir)
		if err == nil || errors.Is(err, os.ErrNotExist) {
			return nil
		}
		if !errors.Is(err, syscall.EBUSY) || time.Now().After(deadline) {
			if populated(dir) {
				return fmt.Errorf("container: cgroup %s still holds processes after the kill: %w", dir, err)
			}
			return fmt.Errorf("container: remove cgroup %s: %w", dir, err)
		}
		killAll(dir)
		time.Sleep(5 * time.Millisecond) // the kernel gives no event for an emptied v1 group
	}
}

// members are the processes in dir's group other than the agent itself:
// a v1 group also lists the agent while the thread that moved itself in
// to start the command (see start) has not yet exited, and that thread
// is not the session's to kill (nor its death ours to wait for).
func members(dir string) []int {
	b, err := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
	if err != nil {
		return nil
	}
	var out []int
	for _, f := range strings.Fields(string(b)) {
		if pid, err := strconv.Atoi(f); err == nil && pid > 0 && pid != os.Getpid() {
			out = append(out, pid)
		}
	}
	return out
}

func populated(dir string) bool { return len(members(dir)) > 0 }

// killAll sends SIGKILL to every process in dir's group (a v1 group, or
// a v2 one without cgroup.kill). See killListed.
func killAll(dir string) { killListed(func() []int { return members(dir) }) }

// killListed kills the processes list names, by pidfd: each pid is pinned
// (pidfd_open), then listed again, and only what is still listed is sent
// the signal. A pid number read from the group may have been freed and
// taken by a process outside it before the kill, which would otherwise
// get the session's SIGKILL; a pinned process still listed is the group's.
// Without pidfds (before Linux 5.3), by pid number.
func killListed(list func() []int) {
	pinned := map[int]int{}
	defer func() {
		for _, fd := range pinned {
			_ = unix.Close(fd)
		}
	}()
	for _, pid := range list() {
		fd, err := unix.PidfdOpen(pid, 0)
		switch {
		case errors.Is(err, unix.ENOSYS):
			_ = syscall.Kill(pid, syscall.SIGKILL) // no pidfds: by number, as before 5.3
		case err == nil:
			pinned[pid] = fd
		} // else gone already
	}
	if len(pinned) == 0 {
		return
	}
	for _, pid := range list() {
		if fd, ok := pinned[pid]; ok {
			_ = unix.PidfdSendSignal(fd, unix.SIGKILL, nil, 0) // gone since is fine
		}
	}
}

// holdsAgent reports whether the agent itself (a thread on its way out)
// is still in dir's group.
func holdsAgent(dir string) bool {
	b, err := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
	return err == nil && containsWord(string(b), strconv.Itoa(os.Getpid()))
}
