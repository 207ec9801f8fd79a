package container

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
)

// cgroupRoot is where cgroup filesystems are mounted.
const cgroupRoot = "/sys/fs/cgroup"

// cgroupParent is the group, under each hierarchy's root, that holds one
// group per sandbox or host session.
const cgroupParent = "attach-agent"

// groupName names a session's or sandbox's group after the process that
// owns it, by pid and start time (KIND-PID.START-RANDOM), so that a later
// agent can tell the groups of one that died, even when its pid is reused
// (see Sweep).
func groupName(kind string) string {
	return fmt.Sprintf("%s-%s-%s", kind, selfOwner(), randomHex(6))
}

var selfOwner = sync.OnceValue(func() string {
	st, err := StartTime(os.Getpid())
	if err != nil {
		return strconv.Itoa(os.Getpid()) // a pid alone: Sweep spares it while the pid lives
	}
	return strconv.Itoa(os.Getpid()) + "." + st
})

// Sweep ends what agents that are gone left behind: the groups of their
// sessions and sandboxes (an agent killed with SIGKILL removes none), with
// any process still in them. Groups of a live agent (a session's worker
// included) are left alone. It returns how many groups it removed. The
// daemon calls it at start.
func Sweep() int {
	return sweep(func(pid int, start string) bool {
		if errors.Is(syscall.Kill(pid, 0), syscall.ESRCH) {
			return true
		}
		if start == "" {
			return false // an old name without a start time: the pid lives, spare it
		}
		st, err := StartTime(pid)
		return err == nil && st != start // the pid was reused
	})
}

// ReleaseOwned ends the groups of the process pid that started at start
// (StartTime), with what is in them: a worker that was killed leaves its
// session's groups so. It returns how many groups it removed.
func ReleaseOwned(pid int, start string) int {
	return sweep(func(p int, st string) bool { return p == pid && st == start })
}

func sweep(gone func(pid int, start string) bool) int {
	mounts, err := cgroupMounts()
	if err != nil {
		return 0
	}
	n := 0
	for _, m := range mounts {
		groups, _ := filepath.Glob(filepath.Join(m.dir, cgroupParent, "*-*-*"))
		for _, g := range groups {
			f := strings.Split(filepath.Base(g), "-")
			if len(f) != 3 || f[0] != "session" && f[0] != "sandbox" {
				continue
			}
			ps, start, _ := strings.Cut(f[1], ".")
			pid, err := strconv.Atoi(ps)
			if err != nil || pid <= 0 || !gone(pid, start) {
				continue // an owner still there (or one we cannot tell): its own
			}
			cg := &cgroup{dirs: []string{g}, v2fd: -1}
			if m.v2 {
				cg.v2 = g
			} else if m.opts["freezer"] {
				cg.freezer = g
			}
			_ = cg.release() // what it cannot remove stays, for the next sweep
			if _, err := os.Stat(g); err != nil {
				n++
			}
		}
	}
	return n
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b) // never fails on Linux
	return hex.EncodeToString(b)
}

// cgroupMount is one mounted cgroup hierarchy.
type cgroupMount struct {
	dir, root string          // mount point, and the fs path mounted there
	v2        bool            // the unified hierarchy
	opts      map[string]bool // v1: its controllers and name=...
}

// cgroupMounts lists the cgroup hierarchies mounted in the agent's view.
func cgroupMounts() ([]cgroupMount, error) {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	var out []cgroupMount
	for _, line := range strings.Split(string(b), "\n") {
		left, right, ok := strings.Cut(line, " - ")
		lf, rf := strings.Fields(left), strings.Fields(right)
		if !ok || len(lf) < 5 || len(rf) < 3 {
			continue
		}
		m := cgroupMount{dir: lf[4], root: lf[3], opts: map[string]bool{}}
		switch rf[0] {
		case "cgroup2":
			m.v2 = true
		case "cgroup":
			for _, o := range strings.Split(rf[2], ",") {
				m.opts[o] = true
			}
		default:
			continue
		}
		out = append(out, m)
	}
	return out, nil
}

// cgroupPlan is where a joined command is born: in every cgroup of the
// container's process, as `docker exec` does, so the container's limits
// hold it and its accounting counts it. Moving the command after it
// starts would let it (and what it forks meanwhile) run outside; instead
// the forking thread moves itself into each v1 hierarchy's group (v1 moves
// single threads through "tasks"), and the unified (v2) group is given to
// clone3 as CLONE_INTO_CGROUP. The thread is discarded after the fork.
type cgroupPlan struct {
	tasks []string // v1: the "tasks" files of the container's groups
	v2fd  int      // the container's v2 group, opened; -1: none
}

// planCgroups finds target's groups in the hierarchies mounted here.
func planCgroups(target int) (*cgroupPlan, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", target))
	if err != nil {
		return nil, fmt.Errorf("container: pid %d: its cgroups: %w", target, err)
	}
	mounts, err := cgroupMounts()
	if err != nil {
		return nil, fmt.Errorf("container: cgroup mounts: %w", err)
	}
	mine, _ := os.ReadFile("/proc/self/cgroup") // unknown: every group is moved into
	return planFrom(target, string(b), string(mine), mounts)
}

// planFrom plans from target's /proc/PID/cgroup (theirs), the agent's
// (mine) and the hierarchies mounted here.
func planFrom(target int, theirs, mine string, mounts []cgroupMount) (*cgroupPlan, error) {
	plan := &cgroupPlan{v2fd: -1}
	// Groups the agent is in already need no move (each move is a
	// migration the kernel serialises with every fork on the host).
	own := map[string]bool{}
	for _, line := range strings.Split(mine, "\n") {
		own[line] = true
	}
	for _, line := range strings.Split(strings.TrimSpace(theirs), "\n") {
		parts := strings.SplitN(line, ":", 3)
		if len(parts) != 3 || own[line] {
			continue
		}
		m := findMount(mounts, parts[1])
		if m == nil {
			continue // a hierarchy not mounted here
		}
		if strings.HasPrefix(parts[2], "/..") {
			plan.close()
			return nil, fmt.Errorf("container: pid %d: its cgroup %s is outside the agent's cgroup namespace: run the agent in the host's (the container's limits could not hold the command)", target, parts[2])
		}
		rel := parts[2]
		if m.root != "/" {
			if rel = strings.TrimPrefix(parts[2], m.root); rel == parts[2] {
				continue // the group is outside what is mounted here
			}
		}
		dir := filepath.Join(m.dir, rel)
		if !m.v2 {
			plan.tasks = append(plan.tasks, filepath.Join(dir, "tasks"))
			continue
		}
		fd, err := syscall.Open(dir, syscall.O_RDONLY|syscall.O_DIRECTORY|syscall.O_CLOEXEC, 0)
		if err != nil {
			plan.close()
			return nil, fmt.Errorf("container: pid %d: its cgroup %s: %w", target, dir, err)
		}
		plan.v2fd = fd
	}
	return plan, nil
}

// enter moves the calling thread, which must be locked to its goroutine
// and discarded afterwards, into the v1 groups; apply has clone3 put the
// child into the v2 group.
func (p *cgroupPlan) enter() error {
	tid := strconv.Itoa(syscall.Gettid())
	for _, f := range p.tasks {
		if err := os.WriteFile(f, []byte(tid), 0); err != nil {
			return fmt.Errorf("container: join cgroup %s: %w", filepath.Dir(f), err)
		}
	}
	return nil
}

func (p *cgroupPlan) apply(attr *syscall.SysProcAttr) {
	if p.v2fd >= 0 {
		attr.UseCgroupFD, attr.CgroupFD = true, p.v2fd
	}
}

func (p *cgroupPlan) close() {
	if p.v2fd >= 0 {
		_ = syscall.Close(p.v2fd) // best effort
		p.v2fd = -1
	}
}

// findMount is the mount of the hierarchy a /proc/PID/cgroup line names
// by its controllers ("" for the unified one).
func findMount(mounts []cgroupMount, ctrls string) *cgroupMount {
	for i, m := range mounts {
		if ctrls == "" {
			if m.v2 {
				return &mounts[i]
			}
			continue
		}
		all := !m.v2
		for _, c := range strings.Split(ctrls, ",") {
			all = all && m.opts[c]
		}
		if all {
			return &mounts[i]
		}
	}
	return nil
}
