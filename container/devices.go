package container

import (
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"
)

// device is one rule of a sandbox's device allowlist: a character device
// (major, minor; minor -1 for any) that may be read and written. Nothing
// may be created (mknod), and no block device opened: without the list a
// root command that made a node for the host's disk could open it.
type device struct {
	major, minor int64
	what         string
}

// allowedDevices are the devices a sandbox binds or makes (see setupDev):
// null, zero, full, random, urandom, tty, ptmx and every pty (its own
// devpts and the session's terminal share major 136).
var allowedDevices = []device{
	{1, 3, "null"}, {1, 5, "zero"}, {1, 7, "full"}, {1, 8, "random"}, {1, 9, "urandom"},
	{5, 0, "tty"}, {5, 2, "ptmx"}, {136, -1, "pts"},
}

// denyDevicesV1 writes the allowlist into a v1 devices group.
func denyDevicesV1(dir string) error {
	if err := os.WriteFile(filepath.Join(dir, "devices.deny"), []byte("a"), 0); err != nil {
		return fmt.Errorf("devices.deny: %w", err)
	}
	for _, d := range allowedDevices {
		minor := fmt.Sprint(d.minor)
		if d.minor < 0 {
			minor = "*"
		}
		rule := fmt.Sprintf("c %d:%s rw", d.major, minor)
		if err := os.WriteFile(filepath.Join(dir, "devices.allow"), []byte(rule), 0); err != nil {
			return fmt.Errorf("devices.allow %q: %w", rule, err)
		}
	}
	return nil
}

// eBPF instruction encodings used by the device program.
const (
	bpfLdxW    = unix.BPF_LDX | unix.BPF_MEM | unix.BPF_W
	bpfMovK    = unix.BPF_ALU64 | unix.BPF_MOV | unix.BPF_K
	bpfMovX    = unix.BPF_ALU64 | unix.BPF_MOV | unix.BPF_X
	bpfAndK    = unix.BPF_ALU64 | unix.BPF_AND | unix.BPF_K
	bpfRshK    = unix.BPF_ALU64 | unix.BPF_RSH | unix.BPF_K
	bpfJneK    = unix.BPF_JMP | unix.BPF_JNE | unix.BPF_K
	bpfExit    = unix.BPF_JMP | unix.BPF_EXIT
	devAccessR = unix.BPF_DEVCG_ACC_READ
	devAccessW = unix.BPF_DEVCG_ACC_WRITE
	devTypeChr = unix.BPF_DEVCG_DEV_CHAR
)

// ebpfInsn is struct bpf_insn.
type ebpfInsn struct {
	code   uint8
	regs   uint8 // dst in the low nibble, src in the high one
	off    int16
	imm    int32
	target int // for jumps: the rule's end, resolved into off
}

// deviceProgram is the allowlist as a BPF_PROG_TYPE_CGROUP_DEVICE
// program, the v2 hierarchy's device controller. Its context is struct
// bpf_cgroup_dev_ctx {u32 access_type (access << 16 | type); u32 major;
// u32 minor}; it returns 1 to allow, 0 to refuse.
func deviceProgram() []byte {
	const r0, r1, r2, r3, r4, r5, r6 = 0, 1, 2, 3, 4, 5, 6
	ins := []ebpfInsn{
		{code: bpfLdxW, regs: r2 | r1<<4, off: 0}, // r2 = access_type
		{code: bpfMovX, regs: r3 | r2<<4},         // r3 = r2
		{code: bpfAndK, regs: r3, imm: 0xffff},    // r3 = type
		{code: bpfRshK, regs: r2, imm: 16},        // r2 = access
		{code: bpfLdxW, regs: r4 | r1<<4, off: 4}, // r4 = major
		{code: bpfLdxW, regs: r5 | r1<<4, off: 8}, // r5 = minor
	}
	for _, d := range allowedDevices {
		var rule []ebpfInsn
		rule = append(rule, ebpfInsn{code: bpfJneK, regs: r3, imm: devTypeChr, target: -1})
		rule = append(rule, ebpfInsn{code: bpfJneK, regs: r4, imm: int32(d.major), target: -1})
		if d.minor >= 0 {
			rule = append(rule, ebpfInsn{code: bpfJneK, regs: r5, imm: int32(d.minor), target: -1})
		}
		rule = append(rule,
			ebpfInsn{code: bpfMovX, regs: r6 | r2<<4},
			ebpfInsn{code: bpfAndK, regs: r6, imm: ^int32(devAccessR | devAccessW)}, // anything but read and write
			ebpfInsn{code: bpfJneK, regs: r6, imm: 0, target: -1},
			ebpfInsn{code: bpfMovK, regs: r0, imm: 1},
			ebpfInsn{code: bpfExit},
		)
		for i := range rule {
			if rule[i].target == -1 {
				rule[i].off = int16(len(rule) - i - 1) // past this rule
			}
		}
		ins = append(ins, rule...)
	}
	ins = append(ins, ebpfInsn{code: bpfMovK, regs: r0, imm: 0}, ebpfInsn{code: bpfExit})
	out := make([]byte, 0, 8*len(ins))
	for _, in := range ins {
		out = append(out, in.code, in.regs)
		out = binary.LittleEndian.AppendUint16(out, uint16(in.off))
		out = binary.LittleEndian.AppendUint32(out, uint32(in.imm))
	}
	return out
}

// bpfProgLoadAttr and bpfProgAttachAttr are the leading fields of union
// bpf_attr for BPF_PROG_LOAD and BPF_PROG_ATTACH; the kernel takes a
// shorter attr as zero past its end.
type bpfProgLoadAttr struct {
	progType, insnCnt  uint32
	insns, license     uint64
	logLevel, logSize  uint32
	logBuf             uint64
	kernVersion, flags uint32
}

type bpfProgAttachAttr struct {
	targetFd, attachBpfFd, attachType, attachFlags uint32
}

// deviceProgramFD is the device program, loaded once for the agent's
// life (the verifier's run is most of an attach's cost) and attached to
// each sandbox's group. It is the same immutable program for all.
var deviceProgramFD = sync.OnceValues(func() (int, error) {
	code := deviceProgram()
	license := []byte("Apache-2.0\x00")
	load := bpfProgLoadAttr{
		progType: unix.BPF_PROG_TYPE_CGROUP_DEVICE, insnCnt: uint32(len(code) / 8),
		insns: uint64(uintptr(unsafe.Pointer(&code[0]))), license: uint64(uintptr(unsafe.Pointer(&license[0]))),
	}
	prog, _, e := unix.Syscall(unix.SYS_BPF, unix.BPF_PROG_LOAD, uintptr(unsafe.Pointer(&load)), unsafe.Sizeof(load))
	runtime.KeepAlive(code)
	runtime.KeepAlive(license)
	if e != 0 {
		return -1, fmt.Errorf("load the device program: %w", e)
	}
	unix.CloseOnExec(int(prog))
	return int(prog), nil
})

// denyDevicesV2 attaches the device program to the v2 group dir; it holds
// every process in the group (and below) from then on.
func denyDevicesV2(dir string) error {
	prog, err := deviceProgramFD()
	if err != nil {
		return err
	}
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer func() { _ = unix.Close(fd) }() // best effort
	attach := bpfProgAttachAttr{targetFd: uint32(fd), attachBpfFd: uint32(prog), attachType: unix.BPF_CGROUP_DEVICE}
	if _, _, e := unix.Syscall(unix.SYS_BPF, unix.BPF_PROG_ATTACH, uintptr(unsafe.Pointer(&attach)), unsafe.Sizeof(attach)); e != 0 {
		return fmt.Errorf("attach the device program to %s: %w", dir, e)
	}
	return nil
}
