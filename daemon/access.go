package daemon

import (
	"context"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"slices"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/attach-agent/attach-agent/agent"
)

// Caller is who made a control API request (see ConnContext).
type Caller = agent.Caller

type callerKey struct{}

// ConnContext records a connection's peer credentials for the API's
// handlers; set it as the http.Server's ConnContext. A connection that is
// not a unix socket gets none, and its requests are refused.
func ConnContext(ctx context.Context, c net.Conn) context.Context {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return ctx
	}
	cred, err := peerCred(uc)
	if err != nil {
		return ctx
	}
	return context.WithValue(ctx, callerKey{}, Caller{UID: cred.Uid, GID: cred.Gid, PID: cred.Pid})
}

// peerCred is the kernel's word on who is at the other end of c
// (SO_PEERCRED): the control API's callers, and the daemons that reach a
// worker's control socket.
func peerCred(c *net.UnixConn) (*unix.Ucred, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return nil, err
	}
	var cred *unix.Ucred
	var cerr error
	if err := rc.Control(func(fd uintptr) { cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED) }); err != nil {
		return nil, err
	}
	return cred, cerr
}

func callerOf(ctx context.Context) (Caller, bool) {
	c, ok := ctx.Value(callerKey{}).(Caller)
	return c, ok
}

// Access is who may use the control API and what a request may ask for.
// The socket's file mode is the first gate; this is the second, and the
// operator's bound on what even an allowed caller can start.
type Access struct {
	// UIDs and GIDs are the callers allowed: a caller whose uid is in
	// UIDs or whose (primary) gid is in GIDs. Both empty: root only.
	UIDs, GIDs []uint32
	// AllowRootUser lets a request run its command as root (no user, or a
	// user that is uid 0 in the container's files).
	AllowRootUser bool
	// AllowJoin lets a request join a running container (container.pid).
	AllowJoin bool
	// AllowPrivileged lets a request start a privileged sandbox.
	AllowPrivileged bool
	// RootfsUnder, when set, holds a sandbox's rootfs to these directories.
	RootfsUnder []string
}

// DefaultAccess is root as the only caller, with every kind of session
// but privileged sandboxes.
func DefaultAccess() Access {
	return Access{AllowRootUser: true, AllowJoin: true}
}

// PolicyError is a request the operator's policy refuses.
type PolicyError = agent.PolicyError

func (a Access) allows(c Caller) bool {
	if len(a.UIDs) == 0 && len(a.GIDs) == 0 {
		return c.UID == 0
	}
	return slices.Contains(a.UIDs, c.UID) || slices.Contains(a.GIDs, c.GID)
}

// check refuses what the policy bounds in spec, before anything starts.
// A user that only the container's passwd file says is root is refused at
// the spawn (Spec.DenyRoot).
func (a Access) check(spec agent.Spec) error {
	ctr := spec.Container
	if !a.AllowRootUser && isRootSpec(spec.User) {
		return &PolicyError{What: "running the command as root (give \"user\")", Flag: "--allow-root-user"}
	}
	if !a.AllowJoin && ctr.PID != 0 {
		return &PolicyError{What: "joining a running container", Flag: "--allow-join"}
	}
	if !a.AllowPrivileged && ctr.Privileged {
		return &PolicyError{What: "a privileged sandbox", Flag: "--allow-privileged"}
	}
	if ctr.Rootfs != "" && len(a.RootfsUnder) > 0 {
		// Links resolved, so that DIR/link -> /etc or DIR/link/.. is not
		// taken for a path below DIR. (A caller who may write below DIR
		// could still swap a link in before the mount: such a DIR must
		// not be writable by callers.)
		rootfs, err := filepath.EvalSymlinks(ctr.Rootfs)
		if err != nil {
			return &PolicyError{What: fmt.Sprintf("rootfs %s: %v", ctr.Rootfs, err), Flag: "--rootfs-under"}
		}
		in := false
		for _, dir := range a.RootfsUnder {
			if d, err := filepath.EvalSymlinks(dir); err == nil {
				dir = d
			}
			rel, err := filepath.Rel(filepath.Clean(dir), rootfs)
			if err == nil && rel != "." && rel != ".." && !strings.HasPrefix(rel, "../") {
				in = true
			}
		}
		if !in {
			return &PolicyError{What: fmt.Sprintf("rootfs %s outside %s", ctr.Rootfs, strings.Join(a.RootfsUnder, ", ")), Flag: "--rootfs-under"}
		}
	}
	return nil
}

func isRootSpec(user string) bool {
	u, g, _ := strings.Cut(user, ":")
	return u == "" || u == "root" || u == "0" || g == "root" || g == "0"
}

var errNoCaller = errors.New("the control API takes requests on its unix socket only: no peer credentials on this connection")
