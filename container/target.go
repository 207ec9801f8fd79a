package container

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// target is the process whose container a session joins, pinned when the
// request arrives: a pidfd (which always means that one process, never a
// later one with its number) and its start time. Its pid is checked
// against both again right before anything is read or entered through
// /proc/PID, and after: a number alone could be reused by the time the
// client pairs, and the command would run somewhere else.
type target struct {
	pid   int
	pidfd int
	start string // field 22 of /proc/PID/stat: clock ticks after boot
	setup setupCtx
}

func pinTarget(pid int) (*target, error) {
	if err := checkTarget(pid); err != nil {
		return nil, err
	}
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		if errors.Is(err, unix.ESRCH) {
			return nil, goneError(pid)
		}
		return nil, fmt.Errorf("container: pid %d: pidfd_open: %w (needs Linux 5.3)", pid, err)
	}
	t := &target{pid: pid, pidfd: fd}
	if t.start, err = StartTime(pid); err != nil {
		t.close()
		return nil, goneError(pid)
	}
	return t, nil
}

func goneError(pid int) error {
	return fmt.Errorf("container process %d is gone: nothing was run; start the session again with a live process of the container", pid)
}

// check fails, saying the process is gone, unless the pinned process is
// still alive under its number.
func (t *target) check() error {
	if err := unix.PidfdSendSignal(t.pidfd, 0, nil, 0); err != nil || exited(t.pid) {
		return goneError(t.pid)
	}
	if st, err := StartTime(t.pid); err != nil || st != t.start {
		return goneError(t.pid)
	}
	return nil
}

// stat fields after the command: state, then ppid...; a zombie has exited.
func exited(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	return len(f) == 0 || f[0] == "Z" || f[0] == "X"
}

func (t *target) close() {
	if t.pidfd >= 0 {
		_ = unix.Close(t.pidfd) // best effort
		t.pidfd = -1
	}
}

// StartTime is when process pid started, in clock ticks since boot
// (field 22 of /proc/PID/stat): with the pid, it names one process for
// good, so that a pid reused by another is never taken for it.
func StartTime(pid int) (string, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return "", err
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	if len(f) < 20 {
		return "", fmt.Errorf("/proc/%d/stat: short", pid)
	}
	return f[19], nil // field 22; f[0] is field 3
}

// confinement is what a joined command takes from its container's process,
// so that it never has more than the container: `docker exec` gives a
// process its container's capabilities, no_new_privs, seccomp filter and
// LSM label.
type confinement struct {
	Bounding    uint64 // the target's bounding set
	Inheritable uint64 // the target's inheritable set
	Permitted   uint64 // the target's permitted set (a root command gets no more, when the target is root)
	// TargetRoot: the target runs as root (real uid 0), so its permitted
	// set says what root has there; a non-root target's does not, and a
	// root command then gets the bounding set (as `docker exec -u root`).
	TargetRoot bool
	NoNewPrivs bool
	// Seccomp: the target runs under a filter (or strict mode). Its
	// filter cannot be read back, so the command gets the sandbox's
	// default filter (defaultFilter), which refuses what Docker's default
	// profile refuses, stacked on whatever the agent itself runs under.
	Seccomp bool
	// LSMLabel is the target's AppArmor profile or SELinux context, put
	// on the command at its exec; LSM names which ("apparmor", "selinux").
	LSMLabel, LSM string
}

// readConfinement reads pid's sets from /proc/PID/status and its label
// from /proc/PID/attr.
func readConfinement(pid int) (confinement, error) {
	var c confinement
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return c, fmt.Errorf("container: pid %d: status: %w", pid, err)
	}
	seen := 0
	for _, line := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		v = strings.TrimSpace(v)
		hex := func(dst *uint64) {
			if n, err := strconv.ParseUint(v, 16, 64); err == nil {
				*dst = n
				seen++
			}
		}
		switch k {
		case "CapBnd":
			hex(&c.Bounding)
		case "CapInh":
			hex(&c.Inheritable)
		case "CapPrm":
			hex(&c.Permitted)
		case "NoNewPrivs":
			c.NoNewPrivs = v == "1"
		case "Uid":
			f := strings.Fields(v)
			c.TargetRoot = len(f) > 0 && f[0] == "0"
		case "Seccomp":
			c.Seccomp = v != "0"
		}
	}
	if seen != 3 {
		return c, fmt.Errorf("container: pid %d: status lacks its capability sets", pid)
	}
	c.LSM, c.LSMLabel = readLabel(pid)
	return c, nil
}

// readLabel is pid's LSM label when one confines it: an AppArmor profile
// other than "unconfined", or an SELinux context.
func readLabel(pid int) (lsm, label string) {
	if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/attr/apparmor/current", pid)); err == nil {
		// "name (mode)"; the unconfined process reads "unconfined".
		name, _, _ := strings.Cut(strings.TrimSpace(string(b)), " (")
		if name != "" && name != "unconfined" {
			return "apparmor", name
		}
		return "", ""
	}
	if b, err := os.ReadFile("/sys/module/apparmor/parameters/enabled"); err == nil && len(b) > 0 && b[0] == 'Y' {
		// Kernels before 5.8 have only the shared attr/current.
		cur, err := os.ReadFile(fmt.Sprintf("/proc/%d/attr/current", pid))
		name, _, _ := strings.Cut(strings.TrimSpace(string(cur)), " (")
		if err == nil && name != "" && name != "unconfined" {
			return "apparmor", name
		}
		return "", ""
	}
	if _, err := os.Stat("/sys/fs/selinux/enforce"); err != nil {
		return "", ""
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/attr/current", pid))
	if l := strings.TrimRight(string(b), "\x00\n"); err == nil && l != "" && l != "kernel" {
		return "selinux", l
	}
	return "", ""
}

// apply confines the calling thread, which must be locked to its
// goroutine and forks the command next: its bounding set (and, for a root
// command, inheritable set) narrowed to the target's, no ambient
// capabilities, the default seccomp filter where the target has a filter,
// and no_new_privs as the target has it. The label is setLabel's, before
// the thread leaves the host's /proc.
func (c confinement) apply(root bool) error {
	keep := c.Bounding
	if root && c.TargetRoot {
		// A root command's exec gives it its bounding and inheritable sets
		// in full: so they also stop at what root holds in the container.
		keep &= c.Permitted | c.Inheritable
	}
	if err := dropBounding(func(cp int) bool { return keep&(1<<uint(cp)) != 0 }, lastCap()); err != nil {
		return err
	}
	if err := narrowInheritable(c.Inheritable&keep, true); err != nil {
		return err
	}
	if c.Seccomp {
		// Before no_new_privs, while the thread holds CAP_SYS_ADMIN: then
		// a target without no_new_privs gives a command without it.
		if err := installFilter(false); err != nil {
			return err
		}
	}
	if c.NoNewPrivs {
		if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
			return fmt.Errorf("no_new_privs: %w", err)
		}
	}
	return nil
}

// setLabel has the thread's next exec, and its children's, take the
// target's LSM label.
func (c confinement) setLabel() error {
	if c.LSMLabel == "" {
		return nil
	}
	return setExecLabel(c.LSM, c.LSMLabel)
}

// narrowInheritable keeps only inh in the calling thread's inheritable
// set and, with clearAmbient, empties its ambient set.
func narrowInheritable(inh uint64, clearAmbient bool) error {
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return fmt.Errorf("capget: %w", err)
	}
	data[0].Inheritable &= uint32(inh)
	data[1].Inheritable &= uint32(inh >> 32)
	if err := unix.Capset(&hdr, &data[0]); err != nil {
		return fmt.Errorf("capset inheritable: %w", err)
	}
	if clearAmbient {
		if err := unix.Prctl(unix.PR_CAP_AMBIENT, unix.PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0); err != nil && !errors.Is(err, unix.EINVAL) {
			return fmt.Errorf("clear ambient capabilities: %w", err)
		}
	}
	return nil
}

// setExecLabel has the thread's next exec take label (as runc does for
// `exec`): AppArmor's "exec PROFILE", or the SELinux context itself.
func setExecLabel(lsm, label string) error {
	file, value := "/proc/thread-self/attr/exec", label
	if lsm == "apparmor" {
		value = "exec " + label
		if _, err := os.Stat("/proc/thread-self/attr/apparmor/exec"); err == nil {
			file = "/proc/thread-self/attr/apparmor/exec"
		}
	}
	if err := os.WriteFile(file, []byte(value), 0); err != nil {
		return fmt.Errorf("%s label %q: %w", lsm, label, err)
	}
	return nil
}

// lastCap is the highest capability this kernel knows.
func lastCap() int {
	if b, err := os.ReadFile("/proc/sys/kernel/cap_last_cap"); err == nil {
		if n, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil {
			return n
		}
	}
	return unix.CAP_LAST_CAP
}

// dropBounding drops every capability keep refuses from the calling
// thread's bounding set.
func dropBounding(keep func(int) bool, last int) error {
	for c := 0; c <= last; c++ {
		if keep(c) {
			continue
		}
		if err := unix.Prctl(unix.PR_CAPBSET_DROP, uintptr(c), 0, 0, 0); err != nil && !errors.Is(err, unix.EINVAL) {
			return fmt.Errorf("drop capability %d: %w", c, err)
		}
	}
	return nil
}
