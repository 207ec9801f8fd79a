//go:build !amd64 && !arm64

package container

// No default filter is written for this architecture: a sandbox that is
// not privileged fails to start, naming it (see defaultFilter).
const (
	auditArch        = 0
	x32Bit           = 0
	cloneFlagsArg    = 0
	lastKnownSyscall = 0
)

var deniedSyscalls []uintptr
