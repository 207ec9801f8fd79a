package container

import (
	"errors"
	"fmt"
	"runtime"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The default seccomp filter, with the semantics of Docker's default
// profile for a container without extra capabilities: the system calls
// that reach past a container's namespaces into the host's kernel (module
// and kexec loading, mounting and the new mount API, keyrings, bpf,
// perf_event_open, clock and swap settings, reboot, quotactl, handles by
// inode, NUMA memory policies, userfaultfd, io_uring, new namespaces) fail
// with EPERM; clone3 fails with ENOSYS, since its flags live in memory a
// filter cannot read and libcs then fall back to clone, whose flags are
// checked; system calls newer than the list fail with ENOSYS, as Docker's
// allowlist does for what it does not know; any other architecture's
// calling convention (i386 through int 0x80, x32) fails with ENOSYS, since
// its numbers mean other calls. ptrace, kcmp and process_vm_* stay allowed,
// as Docker allows them on kernels since 4.8: the kernel's own ptrace
// access checks hold them to the sandbox's processes.
//
// It is built here as classic BPF (no cgo, no libseccomp), so the binary
// stays static.

// nsCloneFlags are the clone flags that make new namespaces.
const nsCloneFlags = unix.CLONE_NEWNS | unix.CLONE_NEWUTS | unix.CLONE_NEWIPC | unix.CLONE_NEWUSER |
	unix.CLONE_NEWPID | unix.CLONE_NEWNET | unix.CLONE_NEWCGROUP | unix.CLONE_NEWTIME

// personalities Docker allows (PER_LINUX, PER_LINUX32, UNAME26 variants,
// and the query 0xffffffff).
var personalities = []uint32{0x0, 0x8, 0x20000, 0x20008, 0xffffffff}

// seccomp_data offsets (linux/seccomp.h): nr, arch, instruction pointer,
// args[6]; a 32-bit load of an argument reads its low half on the
// little-endian machines this is built for.
const (
	offNr   = 0
	offArch = 4
	offArg0 = 16
)

const (
	retAllow = unix.SECCOMP_RET_ALLOW
	retEPERM = unix.SECCOMP_RET_ERRNO | uint32(unix.EPERM)
	retNoSys = unix.SECCOMP_RET_ERRNO | uint32(unix.ENOSYS)
)

// bpfProgram is a classic BPF program under construction, with jumps to
// named labels resolved at the end (cBPF jumps are forward and relative).
type bpfProgram struct {
	insns  []unix.SockFilter
	fixups map[int][2]string // instruction -> labels of jt, jf
	labels map[string]int
}

func newBPF() *bpfProgram {
	return &bpfProgram{fixups: map[int][2]string{}, labels: map[string]int{}}
}

func (p *bpfProgram) stmt(code uint16, k uint32) {
	p.insns = append(p.insns, unix.SockFilter{Code: code, K: k})
}

// jump compares the accumulator with k (op: BPF_JEQ, BPF_JGE, BPF_JGT,
// BPF_JSET) and goes to label jt or jf ("" is the next instruction).
func (p *bpfProgram) jump(op uint16, k uint32, jt, jf string) {
	p.fixups[len(p.insns)] = [2]string{jt, jf}
	p.stmt(unix.BPF_JMP|op|unix.BPF_K, k)
}

func (p *bpfProgram) label(name string) { p.labels[name] = len(p.insns) }

func (p *bpfProgram) load(off uint32) { p.stmt(unix.BPF_LD|unix.BPF_W|unix.BPF_ABS, off) }
func (p *bpfProgram) ret(v uint32)    { p.stmt(unix.BPF_RET|unix.BPF_K, v) }

func (p *bpfProgram) assemble() ([]unix.SockFilter, error) {
	for i, f := range p.fixups {
		for j, name := range f {
			if name == "" {
				continue
			}
			to, ok := p.labels[name]
			d := to - i - 1
			if !ok || d < 0 || d > 255 {
				return nil, fmt.Errorf("seccomp: jump from %d to %q (%d) out of reach", i, name, to)
			}
			if j == 0 {
				p.insns[i].Jt = uint8(d)
			} else {
				p.insns[i].Jf = uint8(d)
			}
		}
	}
	return p.insns, nil
}

// defaultFilter is the sandbox's default filter for this machine's
// architecture.
func defaultFilter() ([]unix.SockFilter, error) {
	if auditArch == 0 {
		return nil, fmt.Errorf("seccomp: no default filter for %s: run the sandbox privileged, or on amd64 or arm64", runtime.GOARCH)
	}
	p := newBPF()
	p.load(offArch)
	p.jump(unix.BPF_JEQ, auditArch, "", "nosys")
	p.load(offNr)
	if x32Bit != 0 {
		p.jump(unix.BPF_JGE, x32Bit, "nosys", "")
	}
	for _, nr := range deniedSyscalls {
		p.jump(unix.BPF_JEQ, uint32(nr), "eperm", "")
	}
	p.jump(unix.BPF_JEQ, unix.SYS_CLONE3, "nosys", "")
	p.jump(unix.BPF_JEQ, unix.SYS_CLONE, "clone", "")
	p.jump(unix.BPF_JEQ, unix.SYS_PERSONALITY, "personality", "")
	p.jump(unix.BPF_JGT, lastKnownSyscall, "nosys", "")
	p.ret(retAllow)

	p.label("clone")
	p.load(offArg0 + cloneFlagsArg*8)
	p.jump(unix.BPF_JSET, nsCloneFlags, "eperm", "")
	p.ret(retAllow)

	p.label("personality")
	p.load(offArg0)
	for _, v := range personalities {
		p.jump(unix.BPF_JEQ, v, "allow", "")
	}
	p.label("eperm")
	p.ret(retEPERM)
	p.label("nosys")
	p.ret(retNoSys)
	p.label("allow")
	p.ret(retAllow)
	return p.assemble()
}

// installFilter installs the default filter on the calling thread, which
// must be locked to its goroutine; processes it forks from then on inherit
// it. With nnp it sets no_new_privs first; without, the thread needs
// CAP_SYS_ADMIN (a joined command keeps the target's no_new_privs, as
// `docker exec` does: setuid programs such as sudo still work).
func installFilter(nnp bool) error {
	prog, err := defaultFilter()
	if err != nil {
		return err
	}
	if nnp {
		if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
			return fmt.Errorf("no_new_privs: %w", err)
		}
	}
	fprog := unix.SockFprog{Len: uint16(len(prog)), Filter: &prog[0]}
	// No SECCOMP_FILTER_FLAG_TSYNC: the filter is for this thread and what
	// it starts, not the whole agent.
	if _, _, e := unix.RawSyscall(unix.SYS_SECCOMP, unix.SECCOMP_SET_MODE_FILTER, 0, uintptr(unsafe.Pointer(&fprog))); e != 0 {
		if errors.Is(e, unix.EINVAL) {
			return fmt.Errorf("seccomp: %w: the kernel has no seccomp filters (CONFIG_SECCOMP_FILTER): run privileged", e)
		}
		return fmt.Errorf("seccomp: %w", e)
	}
	return nil
}
