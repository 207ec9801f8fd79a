package container

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"syscall"

	"github.com/attach-agent/attach-agent/ptyio"
	"golang.org/x/sys/unix"
)

// Main runs the sandbox init or the join helper, and never returns, when
// this process was started as one; otherwise it returns at once. Call it first in main, and
// in TestMain of tests that start sandboxes (their binary is the one
// re-executed).
func Main() {
	if len(os.Args) != 2 {
		return
	}
	switch os.Args[1] {
	case initArg:
		os.Exit(runInit())
	case helperArg:
		os.Exit(runJoinHelper())
	}
}

// runInit is PID 1 of a sandbox: set up its root, start the command, then
// reap every process that ends up ours (orphans are re-parented to PID 1)
// and forward signals, until the command exits; its status is ours. When
// we exit, the kernel kills whatever is left in the namespace.
func runInit() int {
	// One thread for the capability drop and the fork after it: the
	// bounding set is per thread, and the child inherits the forking one's.
	runtime.LockOSThread()
	// fds 3 and 4 came without close-on-exec (as every passed fd does):
	// the command must not hold them, or the agent would never see the
	// report end.
	unix.CloseOnExec(3)
	unix.CloseOnExec(4)
	status := os.NewFile(4, "status")
	report := func(st initStatus) {
		_ = json.NewEncoder(status).Encode(st) // the agent reads it, or has gone
		_ = status.Close()
	}
	var cfg initConfig
	cfgFile := os.NewFile(3, "config")
	if err := json.NewDecoder(cfgFile).Decode(&cfg); err != nil {
		report(initStatus{Code: 125, Err: "sandbox init: read config: " + err.Error()})
		return 125
	}
	// Signals are queued from before the command exists, so none is lost.
	sigs := make(chan os.Signal, 16)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP, syscall.SIGQUIT,
		syscall.SIGUSR1, syscall.SIGUSR2, syscall.SIGCONT)

	if err := setupSandbox(cfg); err != nil {
		report(initStatus{Code: 125, Err: "sandbox: " + err.Error()})
		return 125
	}
	if !cfg.Privileged {
		// On this (locked) thread, which forks the command: what is given
		// up here the command never has.
		// With the host's network a raw socket sees and forges the host's
		// traffic (a container runtime's default network is its own).
		kept := func(c int) bool { return keptCaps[c] && (cfg.NoNet || c != unix.CAP_NET_RAW) }
		err := dropBounding(kept, lastCap())
		if err == nil {
			// A root command gets its bounding and inheritable sets at
			// exec: the agent's inheritable set (a service manager's
			// setting) must not bring back what was dropped.
			err = narrowInheritable(keptMask(), true)
		}
		if err == nil {
			err = installFilter(true)
		}
		if err != nil {
			report(initStatus{Code: 125, Err: "sandbox: " + err.Error()})
			return 125
		}
	}
	child, err := startCommand(cfg)
	if err != nil {
		code := 125
		var se *ptyio.SpawnError
		if errors.As(err, &se) {
			code, err = se.Code, se.Err // the agent names the command itself
		}
		report(initStatus{Code: code, Err: err.Error()})
		return code
	}
	report(initStatus{OK: true})

	go func() {
		// The lifeline (see sandboxLaunch): nothing more comes on it but
		// its end, when the agent is done or gone.
		_, _ = io.Copy(io.Discard, cfgFile)
		_ = unix.Kill(-child, unix.SIGKILL)
		os.Exit(128 + int(unix.SIGKILL)) // as PID 1: the kernel kills the rest
	}()

	go func() {
		for s := range sigs {
			_ = unix.Kill(-child, s.(syscall.Signal)) // the command's whole group; gone is fine
		}
	}()
	return reap(child)
}

// reap waits for any child until child itself has exited.
func reap(child int) int {
	for {
		var ws unix.WaitStatus
		pid, err := unix.Wait4(-1, &ws, 0, nil)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return 125 // no children left, and the command not seen: cannot happen
		}
		if pid != child {
			continue // an orphan, reaped
		}
		if ws.Signaled() {
			return 128 + int(ws.Signal())
		}
		return ws.ExitStatus()
	}
}

func startCommand(cfg initConfig) (int, error) {
	files := []*os.File{os.Stdin, os.Stdout, os.Stderr}
	if cfg.TTY {
		// Reopened by its name inside, so `tty` and ttyname(3) find it.
		con, err := os.OpenFile("/dev/console", os.O_RDWR|unix.O_NOCTTY, 0)
		if err != nil {
			return 0, fmt.Errorf("open /dev/console: %w", err)
		}
		defer func() { _ = con.Close() }() // the command has its own copies
		files = []*os.File{con, con, con}
	}
	if len(cfg.Argv) == 0 {
		return 0, errors.New("empty command")
	}
	path, err := ptyio.Resolve(cfg.Argv[0], cfg.Env, cfg.Dir)
	if err != nil {
		return 0, err
	}
	p, err := os.StartProcess(path, cfg.Argv, &os.ProcAttr{
		Dir: cfg.Dir, Env: cfg.Env, Files: files,
		Sys: &syscall.SysProcAttr{Setsid: true, Setctty: cfg.TTY, Ctty: 0, Credential: cfg.Cred},
	})
	if err != nil {
		return 0, &ptyio.SpawnError{Name: cfg.Argv[0], Code: 125, Err: err}
	}
	return p.Pid, nil
}

// setupSandbox makes the root, /proc, /sys, /dev, hostname, network and
// limits.
// Every mount is made in the sandbox's own mount namespace, private from
// the host's, so all of it goes away with the init.
func setupSandbox(cfg initConfig) error {
	r := cfg.Rootfs
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("make mounts private: %w", err)
	}
	// Where a device node or a setuid file has no business: the image
	// may bring both (a node for the host's disk, a setuid shell).
	var nodev uintptr
	if !cfg.Privileged {
		nodev = unix.MS_NOSUID | unix.MS_NODEV
	}
	if cfg.Scratch != "" {
		var err error
		if r, err = overlayRoot(r, cfg.Scratch, cfg.OverlaySize, nodev); err != nil {
			return err
		}
	}
	// pivot_root needs the new root to be a mount point.
	if err := unix.Mount(r, r, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
		return fmt.Errorf("bind %s: %w", r, err)
	}
	if nodev != 0 {
		// A bind takes its flags only on a remount, which sets them all:
		// so the ones the root has (an operator's read-only, noexec image)
		// are kept.
		if err := unix.Mount("", r, "", unix.MS_REMOUNT|unix.MS_BIND|nodev|mountFlags(r), ""); err != nil {
			return fmt.Errorf("root nosuid,nodev: %w", err)
		}
	}
	if err := mountAt(r, "proc", "proc", "proc", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, ""); err != nil {
		return err
	}
	// A read-only /sys, as container runtimes give: programs look up
	// devices and network interfaces there (a new network namespace
	// shows only its own).
	if err := mountAt(r, "sys", "sysfs", "sysfs", unix.MS_RDONLY|unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, ""); err != nil {
		return err
	}
	if !cfg.Privileged {
		if err := maskPaths(r); err != nil {
			return err
		}
	}
	if err := setupDev(r, cfg.TTY, nodev); err != nil {
		return err
	}
	if !cfg.NoNet {
		// The host's resolver, read-only, so names resolve as on the host
		// (an image rarely brings a resolv.conf that fits the host).
		if err := bindResolvConf(r); err != nil {
			return err
		}
	}
	if err := unix.Sethostname([]byte(cfg.Hostname)); err != nil {
		return fmt.Errorf("hostname: %w", err)
	}
	if cfg.NoNet {
		if err := loopbackUp(); err != nil {
			return err
		}
	}
	// Stack the new root over the old one and detach the old: nothing of
	// the host's filesystem stays reachable.
	if err := unix.Chdir(r); err != nil {
		return err
	}
	if err := unix.PivotRoot(".", "."); err != nil {
		return fmt.Errorf("pivot_root %s: %w", r, err)
	}
	if err := unix.Unmount(".", unix.MNT_DETACH); err != nil {
		return fmt.Errorf("detach the old root: %w", err)
	}
	if err := unix.Chdir("/"); err != nil {
		return err
	}
	return setLimits(cfg.Limits)
}

// overlayRoot puts lower under a writable layer on a tmpfs mounted at
// scratch (in the sandbox's mount namespace only) and returns the merged
// root.
func overlayRoot(lower, scratch string, size int64, nodev uintptr) (string, error) {
	if err := unix.Mount("tmpfs", scratch, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, fmt.Sprintf("mode=755,size=%d", size)); err != nil {
		return "", fmt.Errorf("overlay scratch: %w", err)
	}
	for _, d := range []string{"upper", "work", "root"} {
		if err := os.Mkdir(filepath.Join(scratch, d), 0o755); err != nil {
			return "", fmt.Errorf("overlay scratch: %w", err)
		}
	}
	root := filepath.Join(scratch, "root")
	opts := fmt.Sprintf("lowerdir=%s,upperdir=%s,workdir=%s", lower, filepath.Join(scratch, "upper"), filepath.Join(scratch, "work"))
	if err := unix.Mount("overlay", root, "overlay", nodev, opts); err != nil {
		return "", fmt.Errorf("overlay on %s: %w", lower, err)
	}
	return root, nil
}

// setupDev is a small /dev: the usual character devices bound from the
// host's, a devpts of the sandbox's own (so programs inside can open
// ptys), /dev/shm, and the session's terminal as /dev/console.
func setupDev(r string, tty bool, nodev uintptr) error {
	// nodev holds this tmpfs to the nodes bound below (each bind keeps the
	// host's /dev flags): none made here would open.
	if err := mountAt(r, "dev", "tmpfs", "tmpfs", unix.MS_NOSUID|unix.MS_STRICTATIME|nodev, "mode=755,size=1m"); err != nil {
		return err
	}
	dev := filepath.Join(r, "dev")
	for _, n := range []string{"null", "zero", "full", "random", "urandom", "tty"} {
		if err := bindFile("/dev/"+n, filepath.Join(dev, n)); err != nil {
			return err
		}
	}
	if tty {
		if err := bindConsole(filepath.Join(dev, "console")); err != nil {
			return fmt.Errorf("the session's terminal: %w", err)
		}
	}
	if err := mountAt(dev, "pts", "devpts", "devpts", unix.MS_NOSUID|unix.MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620"); err != nil {
		return err
	}
	if err := mountAt(dev, "shm", "tmpfs", "tmpfs", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, "mode=1777,size=64m"); err != nil {
		return err
	}
	for name, target := range map[string]string{
		"ptmx": "pts/ptmx", "fd": "/proc/self/fd", "stdin": "/proc/self/fd/0",
		"stdout": "/proc/self/fd/1", "stderr": "/proc/self/fd/2",
	} {
		if err := os.Symlink(target, filepath.Join(dev, name)); err != nil {
			return fmt.Errorf("/dev/%s: %w", name, err)
		}
	}
	return nil
}

// bindConsole binds the session's terminal, our stdin, onto target. A
// bind needs a path in our own mount namespace (the fd's mount is the
// agent's), so the terminal is found by its name in our copy of the
// host's mounts, and checked to be the same device.
func bindConsole(target string) error {
	name, err := os.Readlink("/proc/self/fd/0")
	if err != nil {
		return err
	}
	var fdSt, nameSt unix.Stat_t
	if err := unix.Fstat(0, &fdSt); err != nil {
		return err
	}
	if err := unix.Stat(name, &nameSt); err != nil || nameSt.Rdev != fdSt.Rdev || fdSt.Mode&unix.S_IFMT != unix.S_IFCHR {
		return fmt.Errorf("stdin (%s) is not a terminal found by its name", name)
	}
	return bindFile(name, target)
}

// bindResolvConf binds the host's /etc/resolv.conf read-only over the
// sandbox's, when the host has one, the root has an /etc, and its
// resolv.conf is not a symlink.
func bindResolvConf(r string) error {
	if st, err := os.Lstat(filepath.Join(r, "etc")); err != nil || !st.IsDir() {
		return nil // no /etc (or a symlink, which would resolve on the host)
	}
	target := filepath.Join(r, "etc/resolv.conf")
	if st, err := os.Lstat(target); err == nil && st.Mode()&fs.ModeSymlink != 0 {
		return nil // the image manages its own resolver
	}
	if _, err := os.Stat("/etc/resolv.conf"); err != nil {
		return nil
	}
	if err := bindFile("/etc/resolv.conf", target); err != nil {
		return fmt.Errorf("resolv.conf: %w", err)
	}
	// A bind mount takes read-only only on a remount.
	if err := unix.Mount("", target, "", unix.MS_REMOUNT|unix.MS_BIND|unix.MS_RDONLY, ""); err != nil {
		return fmt.Errorf("resolv.conf read-only: %w", err)
	}
	return nil
}

// mountAt mounts fstype on dir/name (name one path element), creating the
// directory if missing. The mount point is opened without following any
// symlink and mounted on through its descriptor: a tenant's process in
// another sandbox on the same root could otherwise swap the directory for
// a link between a check and the mount, and the mount would land
// elsewhere (say /proc, unmasked, somewhere the masks do not reach).
func mountAt(dir, name, source, fstype string, flags uintptr, data string) error {
	target := filepath.Join(dir, name)
	if err := unix.Mkdir(target, 0o755); err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("mount point %s: %w", target, err)
	}
	fd, err := unix.Openat2(unix.AT_FDCWD, target, &unix.OpenHow{
		Flags:   unix.O_PATH | unix.O_DIRECTORY | unix.O_CLOEXEC | unix.O_NOFOLLOW,
		Resolve: unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_MAGICLINKS,
	})
	if err != nil {
		if st, lerr := os.Lstat(target); lerr == nil && st.Mode()&fs.ModeSymlink != 0 {
			// Resolved now, before pivot_root, it would lead out of the root.
			return fmt.Errorf("%s is a symlink: refusing to mount on it", target)
		}
		return fmt.Errorf("mount point %s: %w", target, err)
	}
	defer func() { _ = unix.Close(fd) }() // best effort
	if err := unix.Mount(source, fmt.Sprintf("/proc/self/fd/%d", fd), fstype, flags, data); err != nil {
		return fmt.Errorf("mount %s on %s: %w", fstype, target, err)
	}
	return nil
}

// bindFile binds the file src onto a new empty file at target.
func bindFile(src, target string) error {
	switch st, err := os.Lstat(target); {
	case errors.Is(err, fs.ErrNotExist):
		f, err := os.OpenFile(target, os.O_CREATE|os.O_EXCL|os.O_WRONLY|unix.O_NOFOLLOW, 0o666)
		if err != nil {
			return fmt.Errorf("create %s: %w", target, err)
		}
		_ = f.Close()
	case err != nil:
		return err
	case st.Mode()&fs.ModeSymlink != 0:
		// Resolved now, before pivot_root, it would lead out of the root.
		return fmt.Errorf("%s is a symlink: refusing to mount on it", target)
	}
	if err := unix.Mount(src, target, "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("bind %s on %s: %w", src, target, err)
	}
	return nil
}

// loopbackUp brings up lo in a new network namespace, where it starts
// down.
func loopbackUp() error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("loopback: %w", err)
	}
	defer func() { _ = unix.Close(fd) }() // best effort
	ifr, err := unix.NewIfreq("lo")
	if err != nil {
		return err
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFFLAGS, ifr); err != nil {
		return fmt.Errorf("loopback flags: %w", err)
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP)
	if err := unix.IoctlIfreq(fd, unix.SIOCSIFFLAGS, ifr); err != nil {
		return fmt.Errorf("loopback up: %w", err)
	}
	return nil
}

// setLimits sets the rlimits the command inherits. syscall.Setrlimit, not
// x/sys's, so the Go runtime keeps the NOFILE limit for the child instead
// of restoring its own start-up value.
func setLimits(l Limits) error {
	for _, rl := range []struct {
		name     string
		resource int
		n        uint64
	}{{"nofile", syscall.RLIMIT_NOFILE, l.NoFile}, {"nproc", unix.RLIMIT_NPROC, l.NProc}} {
		if rl.n == 0 {
			continue
		}
		if err := syscall.Setrlimit(rl.resource, &syscall.Rlimit{Cur: rl.n, Max: rl.n}); err != nil {
			return fmt.Errorf("limits.%s %d: %w", rl.name, rl.n, err)
		}
	}
	return nil
}

// keptCaps are what a sandboxed command run as root may keep: the set
// container runtimes give by default (Docker's) less CAP_MKNOD, enough to
// own files, bind low ports, switch users and signal its own processes,
// but not to mount, change the hostname, load modules, trace or make
// device nodes (the device allowlist refuses them anyway).
var keptCaps = map[int]bool{
	unix.CAP_CHOWN: true, unix.CAP_DAC_OVERRIDE: true, unix.CAP_FSETID: true, unix.CAP_FOWNER: true,
	unix.CAP_NET_RAW: true, unix.CAP_SETGID: true, unix.CAP_SETUID: true,
	unix.CAP_SETFCAP: true, unix.CAP_SETPCAP: true, unix.CAP_NET_BIND_SERVICE: true,
	unix.CAP_SYS_CHROOT: true, unix.CAP_KILL: true, unix.CAP_AUDIT_WRITE: true,
}

// maskedPaths are hidden from a sandbox (runc's and Docker's defaults):
// host kernel memory and keys, timers and scheduler state that leak what
// other tenants do, and firmware and power interfaces. A file is covered
// by /dev/null, a directory by an empty read-only tmpfs.
var maskedPaths = []string{
	"proc/acpi", "proc/asound", "proc/interrupts", "proc/kcore", "proc/keys", "proc/latency_stats",
	"proc/timer_list", "proc/timer_stats", "proc/sched_debug", "proc/scsi",
	"sys/firmware", "sys/devices/virtual/powercap",
}

// readonlyPaths are the parts of /proc that write to the host's kernel:
// sysctls (core_pattern runs a program as host root), sysrq, interrupt
// affinity, bus and filesystem settings.
var readonlyPaths = []string{"proc/bus", "proc/fs", "proc/irq", "proc/sys", "proc/sysrq-trigger"}

// maskPaths masks and makes read-only the paths above under r (the
// sandbox's own /proc and /sys, mounted just before: no tenant link is in
// the way).
func maskPaths(r string) error {
	for _, p := range maskedPaths {
		target := filepath.Join(r, p)
		st, err := os.Lstat(target)
		if err != nil {
			continue // not on this kernel
		}
		if st.IsDir() {
			err = unix.Mount("tmpfs", target, "tmpfs", unix.MS_RDONLY|unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, "size=0")
		} else {
			err = unix.Mount("/dev/null", target, "", unix.MS_BIND, "")
		}
		if err != nil {
			return fmt.Errorf("mask /%s: %w", p, err)
		}
	}
	for _, p := range readonlyPaths {
		target := filepath.Join(r, p)
		if _, err := os.Lstat(target); err != nil {
			continue
		}
		if err := unix.Mount(target, target, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
			return fmt.Errorf("/%s read-only: %w", p, err)
		}
		if err := unix.Mount("", target, "", unix.MS_REMOUNT|unix.MS_BIND|unix.MS_RDONLY|unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, ""); err != nil {
			return fmt.Errorf("/%s read-only: %w", p, err)
		}
	}
	return nil
}

// keptMask is keptCaps as a capability mask.
func keptMask() uint64 {
	var m uint64
	for c := range keptCaps {
		m |= 1 << uint(c)
	}
	return m
}

// mountFlags are the per-mount flags of the mount at dir that a bind
// remount must restate to keep.
func mountFlags(dir string) uintptr {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return 0
	}
	var f uintptr
	for _, m := range []struct{ st, ms int64 }{
		{unix.ST_RDONLY, unix.MS_RDONLY}, {unix.ST_NOEXEC, unix.MS_NOEXEC}, {unix.ST_NOATIME, unix.MS_NOATIME},
		{unix.ST_NODIRATIME, unix.MS_NODIRATIME}, {unix.ST_RELATIME, unix.MS_RELATIME},
	} {
		if st.Flags&m.st != 0 {
			f |= uintptr(m.ms)
		}
	}
	return f
}
