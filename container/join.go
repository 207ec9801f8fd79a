package container

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strings"

	"github.com/attach-agent/attach-agent/ptyio"
	"golang.org/x/sys/unix"
)

// joinOrder is the order namespaces are entered in: the mount namespace
// last, since /proc paths change with it (every fd is opened before).
var joinOrder = []struct {
	name string
	flag int
}{
	{"ipc", unix.CLONE_NEWIPC},
	{"uts", unix.CLONE_NEWUTS},
	{"net", unix.CLONE_NEWNET},
	{"pid", unix.CLONE_NEWPID},
	{"cgroup", unix.CLONE_NEWCGROUP},
	{"mnt", unix.CLONE_NEWNS},
}

// joinLaunch starts a command inside the namespaces and root of the
// pinned target process, confined as that process is (see confinement).
// The agent is multi-threaded, and most namespaces are per thread: so
// one OS thread, locked to a goroutine, enters them, chroots, looks the
// program up inside and forks the command, which inherits that thread's
// namespaces (the PID namespace as "for children"), bounding set and
// no_new_privs. The thread is never unlocked, so Go discards it when the
// goroutine ends, and the runtime never starts new threads from a locked
// one: nothing else runs inside.
//
// A seccomp filter on that thread would refuse the clone3 that
// CLONE_INTO_CGROUP needs, so where both are wanted the thread starts the
// agent's own binary as a small helper inside (joinexec.go), which
// installs the filter and execs the command.
func joinLaunch(t *target, conf confinement, cg *cgroupPlan) func(*exec.Cmd) error {
	return func(cmd *exec.Cmd) error {
		if err := t.check(); err != nil {
			return err
		}
		same, err := sameNS(t.pid, "user")
		if err != nil {
			return err
		}
		if !same {
			return onFreshThread(func() error { return nsenterStart(cmd, t, conf, cg) })
		}
		fds, err := openNS(t.pid)
		if err != nil {
			return err
		}
		defer closeAll(fds)
		rootFd, err := unix.Open(fmt.Sprintf("/proc/%d/root", t.pid), unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("container: pid %d: open its root: %w", t.pid, err)
		}
		defer func() { _ = unix.Close(rootFd) }() // best effort
		// Opened through the number, then checked again: had the process
		// gone and its number been taken, the check fails now.
		if err := t.check(); err != nil {
			return err
		}
		return onFreshThread(func() error { return startInside(cmd, fds, rootFd, t, conf, cg) })
	}
}

// onFreshThread runs fn on an OS thread of its own that is discarded
// afterwards, never the main thread: that one cannot be discarded (Go
// would park it for good, in the container's namespaces, and /proc/self
// names the main thread's view). If the goroutine lands on the main
// thread, it keeps it locked while a second goroutine, which then cannot
// land there, does the work.
func onFreshThread(fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		if unix.Gettid() != unix.Getpid() {
			errc <- fn() // never unlocked: see joinLaunch
			return
		}
		defer runtime.UnlockOSThread() // unchanged: it goes back to the pool
		inner := make(chan error, 1)
		go func() {
			runtime.LockOSThread()
			inner <- fn() // never unlocked: see joinLaunch
		}()
		errc <- <-inner
	}()
	return <-errc
}

func startInside(cmd *exec.Cmd, fds []int, rootFd int, t *target, conf confinement, cg *cgroupPlan) error {
	pid := t.pid
	// The thread's root and cwd are shared with the whole process until
	// this; setns into a mount namespace also requires it.
	if err := unix.Unshare(unix.CLONE_FS); err != nil {
		return fmt.Errorf("container: unshare fs: %w", err)
	}
	// While /sys/fs/cgroup is still the agent's.
	if err := cg.enter(); err != nil {
		return err
	}
	cg.apply(cmd.SysProcAttr)
	if err := enterNS(t, fds); err != nil {
		return err
	}
	if err := unix.Fchdir(rootFd); err != nil {
		return fmt.Errorf("container: pid %d: enter its root: %w", pid, err)
	}
	if err := unix.Chroot("."); err != nil {
		return fmt.Errorf("container: pid %d: chroot: %w", pid, err)
	}
	if err := unix.Chdir("/"); err != nil {
		return fmt.Errorf("container: pid %d: chdir /: %w", pid, err)
	}
	path, err := ptyio.Resolve(cmd.Args[0], cmd.Env, cmd.Dir)
	if err != nil {
		return err
	}
	helper := conf.Seccomp && cmd.SysProcAttr.UseCgroupFD
	if err := conf.apply(runsAsRoot(cmd), !helper); err != nil {
		return fmt.Errorf("container: pid %d: confine as the container: %w", pid, err)
	}
	if helper {
		// /proc/self/exe is a magic link: the child execs the agent's
		// binary through the container's /proc, whatever its root holds.
		return startHelper(t.setup, cmd, helperConfig{Path: path, Seccomp: true}, "/proc/self/exe", []string{"attach-agent", helperArg}, nil)
	}
	cmd.Path = path
	return cmd.Start()
}

// enterNS enters the target's namespaces: all at once through its pidfd
// where the kernel allows (Linux 5.8), else through the files opened from
// /proc/PID/ns (checked against the pidfd after they were opened).
func enterNS(t *target, fds []int) error {
	flags := 0
	for i, fd := range fds {
		if fd >= 0 {
			flags |= joinOrder[i].flag
		}
	}
	if flags == 0 {
		return nil
	}
	err := unix.Setns(t.pidfd, flags)
	if err == nil {
		return nil
	}
	if !errors.Is(err, unix.EINVAL) {
		return fmt.Errorf("container: pid %d: enter its namespaces: %w", t.pid, err)
	}
	for i, fd := range fds {
		if fd < 0 {
			continue // already shared with the agent
		}
		if err := unix.Setns(fd, joinOrder[i].flag); err != nil {
			return fmt.Errorf("container: pid %d: enter its %s namespace: %w", t.pid, joinOrder[i].name, err)
		}
	}
	return nil
}

func runsAsRoot(cmd *exec.Cmd) bool {
	c := cmd.SysProcAttr.Credential
	return c == nil || c.Uid == 0
}

// openNS opens pid's namespaces in joinOrder; -1 for one the agent is
// already in (entering it again is harmless but needs no privilege).
func openNS(pid int) ([]int, error) {
	fds := make([]int, len(joinOrder))
	for i := range fds {
		fds[i] = -1
	}
	for i, ns := range joinOrder {
		same, err := sameNS(pid, ns.name)
		if err != nil {
			closeAll(fds)
			return nil, err
		}
		if same {
			continue
		}
		fd, err := unix.Open(fmt.Sprintf("/proc/%d/ns/%s", pid, ns.name), unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			closeAll(fds)
			return nil, fmt.Errorf("container: pid %d: open its %s namespace: %w", pid, ns.name, err)
		}
		fds[i] = fd
	}
	return fds, nil
}

func closeAll(fds []int) {
	for _, fd := range fds {
		if fd >= 0 {
			_ = unix.Close(fd) // best effort
		}
	}
}

// sameNS reports whether pid is in the agent's own namespace of kind name.
func sameNS(pid int, name string) (bool, error) {
	var mine, theirs unix.Stat_t
	if err := unix.Stat("/proc/self/ns/"+name, &mine); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return true, nil // a kernel without this namespace kind
		}
		return false, fmt.Errorf("container: own %s namespace: %w", name, err)
	}
	if err := unix.Stat(fmt.Sprintf("/proc/%d/ns/%s", pid, name), &theirs); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return false, checkTarget(pid)
		}
		return false, fmt.Errorf("container: pid %d: %s namespace: %w", pid, name, err)
	}
	return mine.Dev == theirs.Dev && mine.Ino == theirs.Ino, nil
}

// nsenterStart joins a container in another user namespace through
// util-linux's nsenter: setns into a user namespace is refused to a
// multi-threaded process, which a Go program always is, and nsenter is a
// single-threaded C program that does it before exec. Entering a user
// namespace gives a full bounding set again, so nsenter does not start
// the command itself: it starts the agent's own binary as a helper inside
// (joinexec.go), which switches to the user, confines itself as the
// target and execs the command. nsenter is handed the namespaces and the
// root as files opened (and checked against the pidfd) here, its working
// directory is the container's root, never the agent's, and its
// environment is empty: nothing of the request reaches it.
func nsenterStart(cmd *exec.Cmd, t *target, conf confinement, cg *cgroupPlan) error {
	pid := t.pid
	nsenter, err := exec.LookPath("nsenter")
	if err != nil {
		return fmt.Errorf("container: pid %d is in another user namespace, which needs util-linux's nsenter to join: install it (package util-linux)", pid)
	}
	names := []string{"user", "mnt", "uts", "ipc", "net", "pid", "cgroup", "root"}
	var files []*os.File
	defer func() {
		for _, f := range files {
			_ = f.Close() // nsenter has its own copies
		}
	}()
	for _, n := range names {
		path := fmt.Sprintf("/proc/%d/ns/%s", pid, n)
		if n == "root" {
			path = fmt.Sprintf("/proc/%d/root", pid)
		}
		f, err := os.Open(path)
		if err != nil {
			return fmt.Errorf("container: pid %d: open %s: %w", pid, path, err)
		}
		files = append(files, f)
	}
	if err := t.check(); err != nil {
		return err
	}
	exe, err := os.Open("/proc/self/exe")
	if err != nil {
		return fmt.Errorf("container: the agent's own binary: %w", err)
	}
	files = append(files, exe)
	// The helper's config and status pipes are fds 3 and 4 (startHelper);
	// these follow.
	first := 3 + 2
	flag := map[string]string{"user": "--user", "mnt": "--mount", "uts": "--uts", "ipc": "--ipc",
		"net": "--net", "pid": "--pid", "cgroup": "--cgroup", "root": "--root"}
	args := []string{"nsenter"}
	for i, n := range names {
		args = append(args, fmt.Sprintf("%s=/proc/self/fd/%d", flag[n], first+i))
	}
	args = append(args, fmt.Sprintf("--wd=/proc/self/fd/%d", first+len(names)-1))
	attr := cmd.SysProcAttr
	hc := helperConfig{Confine: &conf, Seccomp: conf.Seccomp, Cred: attr.Credential, Root: runsAsRoot(cmd)}
	if c := attr.Credential; c != nil {
		attr.Credential = nil // nsenter needs root to enter; the helper switches after
		// The terminal was handed to the uid as the host numbers it; in
		// the container's namespace that uid is another host uid.
		if tty, ok := cmd.Stdin.(*os.File); ok && attr.Setctty {
			hostUID, err := hostID(pid, "uid_map", c.Uid)
			if err != nil {
				return err
			}
			if err := tty.Chown(int(hostUID), -1); err != nil {
				return fmt.Errorf("container: hand the pty to uid %d: %w", hostUID, err)
			}
		}
	}
	// nsenter, and so what it forks, is born in the container's cgroups
	// (see cgroupPlan).
	if err := cg.enter(); err != nil {
		return err
	}
	cg.apply(attr)
	exePath := fmt.Sprintf("/proc/self/fd/%d", first+len(names))
	return startHelper(t.setup, cmd, hc, nsenter, append(args, "--", exePath, helperArg), files)
}

// hostID maps id, as the user namespace of pid numbers it, to the agent's
// numbering through /proc/PID/uid_map or gid_map.
func hostID(pid int, mapFile string, id uint32) (uint32, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/%s", pid, mapFile))
	if err != nil {
		return 0, fmt.Errorf("container: pid %d: %s: %w", pid, mapFile, err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		var inside, outside, n uint64
		if _, err := fmt.Sscan(line, &inside, &outside, &n); err == nil && uint64(id) >= inside && uint64(id) < inside+n {
			return uint32(outside + uint64(id) - inside), nil
		}
	}
	return 0, fmt.Errorf("container: pid %d: id %d is not mapped in its user namespace: pick a user the container maps", pid, id)
}
