package container

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
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

// joinLaunch starts a command inside the namespaces and root of process
// pid. The agent is multi-threaded, and most namespaces are per thread: so
// one OS thread, locked to a goroutine, enters them, chroots, looks the
// program up inside and forks the command, which inherits that thread's
// namespaces (the PID namespace as "for children"). The thread is never
// unlocked, so Go discards it when the goroutine ends, and the runtime
// never starts new threads from a locked one: nothing else runs inside.
func joinLaunch(pid int, cg *cgroupPlan) func(*exec.Cmd) error {
	return func(cmd *exec.Cmd) error {
		same, err := sameNS(pid, "user")
		if err != nil {
			return err
		}
		if !same {
			return onFreshThread(func() error { return nsenterStart(cmd, pid, cg) })
		}
		fds, err := openNS(pid)
		if err != nil {
			return err
		}
		defer closeAll(fds)
		rootFd, err := unix.Open(fmt.Sprintf("/proc/%d/root", pid), unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("container: pid %d: open its root: %w", pid, err)
		}
		defer func() { _ = unix.Close(rootFd) }() // best effort

		return onFreshThread(func() error { return startInside(cmd, fds, rootFd, pid, cg) })
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

func startInside(cmd *exec.Cmd, fds []int, rootFd, pid int, cg *cgroupPlan) error {
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
	for i, fd := range fds {
		if fd < 0 {
			continue // already shared with the agent
		}
		if err := unix.Setns(fd, joinOrder[i].flag); err != nil {
			return fmt.Errorf("container: pid %d: enter its %s namespace: %w", pid, joinOrder[i].name, err)
		}
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
	cmd.Path = path
	return cmd.Start()
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
// single-threaded C program that does it before exec. Its limits: the
// command gets the user's primary group only (nsenter clears supplementary
// groups), and a missing program is reported by nsenter on the terminal
// (status 126/127) rather than as a spawn error.
func nsenterStart(cmd *exec.Cmd, pid int, cg *cgroupPlan) error {
	nsenter, err := exec.LookPath("nsenter")
	if err != nil {
		return fmt.Errorf("container: pid %d is in another user namespace, which needs util-linux's nsenter to join: install it (package util-linux)", pid)
	}
	args := []string{"nsenter", "--target", fmt.Sprint(pid),
		"--user", "--mount", "--uts", "--ipc", "--net", "--pid", "--cgroup", "--root"}
	if cmd.Dir != "" {
		// Opened by nsenter before it enters the namespaces: so the path
		// is the container's directory as the agent sees it.
		args = append(args, "--wd="+filepath.Join(fmt.Sprintf("/proc/%d/root", pid), cmd.Dir))
	}
	attr := cmd.SysProcAttr
	if c := attr.Credential; c != nil {
		args = append(args, "--setuid", fmt.Sprint(c.Uid), "--setgid", fmt.Sprint(c.Gid))
		attr.Credential = nil // nsenter needs root to enter; it switches after
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
	// Without a user, nsenter makes the command root inside, as the agent
	// is outside.
	cmd.Path = nsenter
	cmd.Args = append(append(args, "--"), cmd.Args...)
	cmd.Dir = ""
	// nsenter, and so the command it forks, is born in the container's
	// cgroups (see cgroupPlan).
	if err := cg.enter(); err != nil {
		return err
	}
	cg.apply(attr)
	return cmd.Start()
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
