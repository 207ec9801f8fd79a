// Command probe tries, from inside a sandbox or container under test, the
// system calls a hostile tenant would, and prints one line each:
// "NAME: ok" or "NAME: ERRNO". "probe seccomp-exec CMD..." runs CMD under
// a seccomp filter instead. busybox has no applet for them. Tests
// build it static (testroot.Probe) into the root they make.
package main

import (
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"unsafe"

	"golang.org/x/sys/unix"
)

func main() {
	if len(os.Args) > 2 && os.Args[1] == "seccomp-exec" {
		seccompExec(os.Args[2:])
	}
	for _, name := range os.Args[1:] {
		var err error
		switch name {
		case "keyctl": // the session keyring: shared with the host's kernel
			_, _, e := unix.Syscall(unix.SYS_KEYCTL, unix.KEYCTL_GET_KEYRING_ID, uintptr(0xfffffffd), 1)
			err = errno(e)
		case "clone3": // flags a filter cannot see
			args := make([]byte, 88)
			_, _, e := unix.Syscall(unix.SYS_CLONE3, uintptr(unsafe.Pointer(&args[0])), uintptr(len(args)), 0)
			err = errno(e)
		case "userns":
			err = unix.Unshare(unix.CLONE_NEWUSER)
		case "mount":
			err = unix.Mount("none", "/tmp", "tmpfs", 0, "")
		case "bpf":
			_, _, e := unix.Syscall(unix.SYS_BPF, unix.BPF_PROG_LOAD, 0, 0)
			err = errno(e)
		default:
			// w:PATH: may PATH be written? access(2) only, never a write
			// (a host sysctl must not change under a test).
			if path, ok := strings.CutPrefix(name, "w:"); ok {
				err = unix.Access(path, unix.W_OK)
				break
			}
			err = fmt.Errorf("unknown probe")
		}
		if err == nil {
			fmt.Printf("%s: ok\n", name)
		} else {
			fmt.Printf("%s: %v\n", name, err)
		}
	}
}

func errno(e unix.Errno) error {
	if e == 0 {
		return nil
	}
	return e
}

// seccompExec runs argv under a seccomp filter that allows everything
// (and so with no_new_privs): a stand-in for a container's process under
// its runtime's profile. Both are a thread's, as is the exec: all three
// on one locked thread. Unlocked, the goroutine once moved between them,
// and sleep ran with the filter but without no_new_privs (root may
// install one without it), which TestJoinUnderSeccomp then found its
// joined command copying.
func seccompExec(argv []string) {
	runtime.LockOSThread()
	allow := []unix.SockFilter{{Code: unix.BPF_RET | unix.BPF_K, K: unix.SECCOMP_RET_ALLOW}}
	prog := unix.SockFprog{Len: 1, Filter: &allow[0]}
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		fmt.Fprintln(os.Stderr, "probe: no_new_privs:", err)
		os.Exit(125)
	}
	if err := unix.Prctl(unix.PR_SET_SECCOMP, unix.SECCOMP_MODE_FILTER, uintptr(unsafe.Pointer(&prog)), 0, 0); err != nil {
		fmt.Fprintln(os.Stderr, "probe: seccomp:", err)
		os.Exit(125)
	}
	path, err := exec.LookPath(argv[0])
	if err == nil {
		err = unix.Exec(path, argv, os.Environ())
	}
	fmt.Fprintln(os.Stderr, "probe:", err)
	os.Exit(127)
}
