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
	if t.start, err = startTime(pid); err != nil {
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
	if err := unix.PidfdSendSignal(t.pidfd, 0, nil, 0); err != nil {
		return goneError(t.pid)
	}
	if st, err := startTime(t.pid); err != nil || st != t.start {
		return goneError(t.pid)
	}
	return nil
}

func (t *target) close() {
	if t.pidfd >= 0 {
		_ = unix.Close(t.pidfd) // best effort
		t.pidfd = -1
	}
}

func startTime(pid int) (string, error) {
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
	Permitted   uint64 // the target's permitted set (a root command gets no more)
	NoNewPrivs  bool
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
// goroutine and is discarded after it forks or execs: its bounding set
// (and, for a root command, inheritable set) narrowed to the target's, no
// ambient capabilities, no_new_privs as the target has it, the label for
// the next exec. withSeccomp installs the filter too (with no_new_privs:
// a filter needs it when the thread may lose its capabilities).
func (c confinement) apply(root bool, withSeccomp bool) error {
	last := lastCap()
	keep := c.Bounding
	if root {
		// A root command's exec gives it its bounding and inheritable sets
		// in full: so they also stop at what the target may hold.
		keep &= c.Permitted | c.Inheritable
	}
	if err := dropBounding(func(cp int) bool { return keep&(1<<uint(cp)) != 0 }, last); err != nil {
		return err
	}
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return fmt.Errorf("capget: %w", err)
	}
	inh := c.Inheritable & keep
	data[0].Inheritable &= uint32(inh)
	data[1].Inheritable &= uint32(inh >> 32)
	if err := unix.Capset(&hdr, &data[0]); err != nil {
		return fmt.Errorf("capset inheritable: %w", err)
	}
	if err := unix.Prctl(unix.PR_CAP_AMBIENT, unix.PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0); err != nil && !errors.Is(err, unix.EINVAL) {
		return fmt.Errorf("clear ambient capabilities: %w", err)
	}
	if c.NoNewPrivs {
		if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
			return fmt.Errorf("no_new_privs: %w", err)
		}
	}
	if c.LSMLabel != "" {
		if err := setExecLabel(c.LSM, c.LSMLabel); err != nil {
			return err
		}
	}
	if withSeccomp && c.Seccomp {
		return installFilter()
	}
	return nil
}

// setExecLabel has the thread's next exec take label (as runc does for
// `exec`): AppArmor's "exec PROFILE", or the SELinux context itself.
func setExecLabel(lsm, label string) error {
	file, value := "/proc/thread-self/attr/exec", label
	if lsm == "apparmor" {
		file, value = "/proc/thread-self/attr/apparmor/exec", "exec "+label
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
