package container

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"

	"github.com/attach-agent/attach-agent/ptyio"

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
// In the agent's own user namespace, one OS thread of the agent, locked
// to a goroutine and discarded after (never unlocked, so Go ends it with
// the goroutine), enters the namespaces through the files it opened and
// checked against the pidfd, chroots, confines itself (label, bounding
// set, seccomp, no_new_privs), looks the program up inside and forks the
// command, which inherits all of it (the PID namespace as "for
// children"). Nothing privileged is ever exec'd inside the container.
//
// A seccomp filter on that thread refuses clone3, which CLONE_INTO_CGROUP
// needs; where the command must be born in a v2 group, it is started
// stopped at its exec (ptrace) and moved into the group before it runs a
// single instruction, then let go.
//
// A container in another user namespace is entered through util-linux's
// nsenter for that one namespace (a Go program, always multi-threaded,
// cannot enter one), which execs the agent's own binary through a file
// descriptor the agent holds, by the host's /proc, as the join helper
// (joinexec.go): it enters the other namespaces itself, forks the command
// and stays its parent in the host's PID namespace, never visible to the
// container's processes (which could open its /proc/PID/exe otherwise, as
// in CVE-2019-5736).
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
		if sameUser {
			return onFreshThread(func() error { return startInside(cmd, t, hc, files, cg) })
		}
		attr.Credential = nil // the helper needs root to enter; the command gets the credential
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
		path, args := nsenter, []string{"nsenter", fmt.Sprintf("--user=/proc/self/fd/%d", 5+len(files)-2),
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

// startInside enters the container on the calling thread (fresh, locked,
// discarded after), confines it and forks the command there.
func startInside(cmd *exec.Cmd, t *target, hc helperConfig, files []*os.File, cg *cgroupPlan) error {
	// While /sys/fs/cgroup is still the agent's.
	if err := cg.enter(); err != nil {
		return err
	}
	if err := hc.Confine.setLabel(); err != nil { // while /proc is the host's
		return err
	}
	if err := unix.Unshare(unix.CLONE_FS); err != nil {
		return fmt.Errorf("container: unshare fs: %w", err)
	}
	if err := enterNS(t, hc, files); err != nil {
		return err
	}
	if err := unix.Fchdir(int(files[hc.RootFD-5].Fd())); err != nil {
		return fmt.Errorf("container: pid %d: enter its root: %w", t.pid, err)
	}
	if err := unix.Chroot("."); err != nil {
		return fmt.Errorf("container: pid %d: chroot: %w", t.pid, err)
	}
	if err := unix.Chdir("/"); err != nil {
		return err
	}
	path, err := ptyio.Resolve(cmd.Args[0], cmd.Env, cmd.Dir)
	if err != nil {
		return err
	}
	cmd.Path = path
	if err := hc.Confine.apply(hc.Root); err != nil {
		return fmt.Errorf("container: pid %d: confine as the container: %w", t.pid, err)
	}
	attr := cmd.SysProcAttr
	if !hc.Confine.Seccomp || cg.v2fd < 0 {
		cg.apply(attr)
		return cmd.Start()
	}
	procs, err := unix.Openat(cg.v2fd, "cgroup.procs", unix.O_WRONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("container: pid %d: its v2 cgroup: %w", t.pid, err)
	}
	defer func() { _ = unix.Close(procs) }() // best effort
	attr.Ptrace = true
	if err := cmd.Start(); err != nil {
		return err
	}
	pid := cmd.Process.Pid
	abort := func(err error) error {
		_ = unix.Kill(pid, unix.SIGKILL)
		_, _ = cmd.Process.Wait()
		return err
	}
	// Stopped at its exec (SIGTRAP), before the program's first
	// instruction.
	var ws unix.WaitStatus
	for {
		_, err := unix.Wait4(pid, &ws, unix.WALL, nil)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return abort(fmt.Errorf("container: wait for the command's exec: %w", err))
		}
		break
	}
	if !ws.Stopped() {
		return abort(fmt.Errorf("container: the command did not stop at its exec (status %v)", ws))
	}
	// The move is written from another thread, in the agent's own cgroup
	// namespace (this one's is the container's, where the agent's group,
	// the command's source, is not to be seen).
	moved := make(chan error, 1)
	go func() {
		_, err := unix.Write(procs, []byte(strconv.Itoa(pid)))
		moved <- err
	}()
	if err := <-moved; err != nil {
		return abort(fmt.Errorf("container: pid %d: move the command into its v2 cgroup: %w", t.pid, err))
	}
	if err := unix.PtraceDetach(pid); err != nil {
		return abort(fmt.Errorf("container: let the command go: %w", err))
	}
	return nil
}

// enterNS enters the target's namespaces: all at once through its pidfd
// where the kernel allows (Linux 5.8), else one by one through the files
// opened from /proc/PID/ns and checked against the pidfd after.
func enterNS(t *target, hc helperConfig, files []*os.File) error {
	flags := 0
	for _, ns := range hc.NS {
		flags |= ns.Flag
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
	for _, ns := range hc.NS {
		if err := unix.Setns(int(files[ns.FD-5].Fd()), ns.Flag); err != nil {
			return fmt.Errorf("container: pid %d: enter its %s namespace: %w", t.pid, ns.Name, err)
		}
	}
	return nil
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
