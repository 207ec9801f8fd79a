package container

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strings"

	"golang.org/x/sys/unix"
)

// joinOrder is the order the helper enters namespaces in: the mount
// namespace last, since it changes what paths mean (every fd is opened
// before, by the agent).
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
//
// The agent does not enter the container itself. It starts its own
// binary, by the host's /proc/self/exe, from the host's namespaces, as
// the join helper (joinexec.go), born in the container's cgroups, and
// hands it the container's namespaces and root as files it opened and
// checked against the pidfd. The helper enters them on one thread,
// chroots, confines that thread (bounding set, no_new_privs, seccomp,
// label), looks the program up inside and forks the command, whose
// parent it stays until it exits. So nothing of the tenant's filesystem
// picks what runs as root (a chroot or a /proc the tenant made would),
// and the helper, in the host's PID namespace, is never visible to the
// container's processes (which could open its /proc/PID/exe otherwise, as
// in CVE-2019-5736). A container in another user namespace is entered
// through util-linux's nsenter for that one namespace (a Go program,
// always multi-threaded, cannot), which then execs the helper through a
// file descriptor the agent holds, by the host's /proc.
func joinLaunch(t *target, conf confinement, cg *cgroupPlan) func(*exec.Cmd) error {
	return func(cmd *exec.Cmd) error {
		if err := t.check(); err != nil {
			return err
		}
		sameUser, err := sameNS(t.pid, "user")
		if err != nil {
			return err
		}
		var files []*os.File
		defer func() {
			for _, f := range files {
				_ = f.Close() // the helper has its own copies
			}
		}()
		hc := helperConfig{Confine: conf, Root: runsAsRoot(cmd), Cred: cmd.SysProcAttr.Credential}
		// The helper's config and status pipes are fds 3 and 4; these
		// follow from 5.
		for _, ns := range joinOrder {
			same, err := sameNS(t.pid, ns.name)
			if err != nil {
				return err
			}
			if same {
				continue // entering it again needs no privilege, and gains nothing
			}
			f, err := os.Open(fmt.Sprintf("/proc/%d/ns/%s", t.pid, ns.name))
			if err != nil {
				return fmt.Errorf("container: pid %d: open its %s namespace: %w", t.pid, ns.name, err)
			}
			hc.NS = append(hc.NS, helperNS{Flag: ns.flag, Name: ns.name, FD: 5 + len(files)})
			files = append(files, f)
		}
		root, err := os.OpenFile(fmt.Sprintf("/proc/%d/root", t.pid), unix.O_PATH|unix.O_DIRECTORY, 0)
		if err != nil {
			return fmt.Errorf("container: pid %d: open its root: %w", t.pid, err)
		}
		hc.RootFD = 5 + len(files)
		files = append(files, root)
		// Opened through the number, then checked again: had the process
		// gone and its number been taken, the check fails now.
		if err := t.check(); err != nil {
			return err
		}
		attr := cmd.SysProcAttr
		attr.Credential = nil // the helper needs root to enter; the command gets the credential
		path, args := "/proc/self/exe", []string{"attach-agent", helperArg}
		if !sameUser {
			nsenter, err := exec.LookPath("nsenter")
			if err != nil {
				return fmt.Errorf("container: pid %d is in another user namespace, which needs util-linux's nsenter to enter: install it (package util-linux)", t.pid)
			}
			user, err := os.Open(fmt.Sprintf("/proc/%d/ns/user", t.pid))
			if err != nil {
				return fmt.Errorf("container: pid %d: open its user namespace: %w", t.pid, err)
			}
			files = append(files, user)
			exe, err := os.Open("/proc/self/exe")
			if err != nil {
				return fmt.Errorf("container: the agent's own binary: %w", err)
			}
			files = append(files, exe)
			if err := t.check(); err != nil {
				return err
			}
			// nsenter enters the user namespace only (as root there), so
			// the helper's path is resolved in the host's mount namespace.
			path, args = nsenter, []string{"nsenter", fmt.Sprintf("--user=/proc/self/fd/%d", 5+len(files)-2),
				"--", fmt.Sprintf("/proc/self/fd/%d", 5+len(files)-1), helperArg}
			if c := hc.Cred; c != nil {
				// The terminal was handed to the uid as the host numbers it;
				// in the container's namespace that uid is another host uid.
				if tty, ok := cmd.Stdin.(*os.File); ok && attr.Setctty {
					hostUID, err := hostID(t.pid, "uid_map", c.Uid)
					if err != nil {
						return err
					}
					if err := tty.Chown(int(hostUID), -1); err != nil {
						return fmt.Errorf("container: hand the pty to uid %d: %w", hostUID, err)
					}
				}
			}
		}
		// Born in the container's cgroups (see cgroupPlan), from a thread
		// that is discarded after.
		return onFreshThread(func() error {
			if err := cg.enter(); err != nil {
				return err
			}
			cg.apply(attr)
			return startHelper(t.setup, cmd, hc, path, args, files)
		})
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

func runsAsRoot(cmd *exec.Cmd) bool {
	c := cmd.SysProcAttr.Credential
	return c == nil || c.Uid == 0
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
			return false, goneError(pid) // pinned earlier: it was there
		}
		return false, fmt.Errorf("container: pid %d: %s namespace: %w", pid, name, err)
	}
	return mine.Dev == theirs.Dev && mine.Ino == theirs.Ino, nil
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
