package container

import (
	"errors"
	"fmt"
	"io"
	"os"

	"golang.org/x/sys/unix"
)

// maxRootFile bounds what is read of a tenant's file (passwd, group): an
// image could make it endless.
const maxRootFile = 1 << 20

// root is a tenant's root directory, opened once, through which every
// path is resolved inside it (openat2 with RESOLVE_IN_ROOT): "..", and
// absolute symlinks, stay in it, as they will for the command. An image
// is the tenant's: its /etc/passwd may be a symlink to the host's, a FIFO
// that never answers or a device that never ends.
type root struct {
	fd   int
	name string // for errors
}

func openRoot(path string) (*root, error) {
	fd, err := unix.Open(path, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("container: root %s: %w", path, err)
	}
	return &root{fd: fd, name: path}, nil
}

func (r *root) close() { _ = unix.Close(r.fd) } // best effort

// open opens rel (absolute or not, as the tenant sees it) inside the
// root. O_NONBLOCK: a FIFO opens at once instead of waiting for a writer.
func (r *root) open(rel string, flags uint64) (int, error) {
	flags |= unix.O_CLOEXEC
	if flags&unix.O_PATH == 0 { // openat2 takes no other flag with O_PATH
		flags |= unix.O_NOCTTY | unix.O_NONBLOCK
	}
	how := unix.OpenHow{Flags: flags, Resolve: unix.RESOLVE_IN_ROOT | unix.RESOLVE_NO_MAGICLINKS}
	for i := 0; ; i++ {
		fd, err := unix.Openat2(r.fd, rel, &how)
		if errors.Is(err, unix.EAGAIN) && i < 16 {
			continue // RESOLVE_IN_ROOT met a concurrent rename: try again (bounded)
		}
		if errors.Is(err, unix.ENOSYS) {
			return -1, fmt.Errorf("%s: openat2: %w: resolving inside a container's root needs Linux 5.6", rel, err)
		}
		return fd, err
	}
}

// stat is rel's status inside the root, following links inside it.
func (r *root) stat(rel string) (unix.Stat_t, error) {
	var st unix.Stat_t
	fd, err := r.open(rel, unix.O_PATH)
	if err != nil {
		return st, err
	}
	defer func() { _ = unix.Close(fd) }() // best effort
	err = unix.Fstat(fd, &st)
	return st, err
}

// isDir reports whether rel is a directory inside the root.
func (r *root) isDir(rel string) bool {
	st, err := r.stat(rel)
	return err == nil && st.Mode&unix.S_IFMT == unix.S_IFDIR
}

// readFile reads the regular file rel inside the root, at most
// maxRootFile bytes; anything else (a FIFO, a device, a directory, a
// larger file) is an error that names it. It is found with O_PATH and
// checked before it is opened for reading: opening a device node runs its
// driver, as host root and outside the container's device cgroup.
func (r *root) readFile(rel string) ([]byte, error) {
	pfd, err := r.open(rel, unix.O_PATH)
	if err != nil {
		return nil, fmt.Errorf("%s in %s: %w", rel, r.name, err)
	}
	defer func() { _ = unix.Close(pfd) }() // best effort
	var st unix.Stat_t
	if err := unix.Fstat(pfd, &st); err != nil {
		return nil, err
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return nil, fmt.Errorf("%s in %s: not a regular file", rel, r.name)
	}
	if st.Size > maxRootFile {
		return nil, fmt.Errorf("%s in %s: larger than %d bytes", rel, r.name, maxRootFile)
	}
	// The same inode, reopened for reading through its O_PATH descriptor.
	f, err := os.OpenFile(fmt.Sprintf("/proc/self/fd/%d", pfd), os.O_RDONLY|unix.O_NONBLOCK|unix.O_NOCTTY, 0)
	if err != nil {
		return nil, fmt.Errorf("%s in %s: %w", rel, r.name, err)
	}
	defer func() { _ = f.Close() }() // best effort
	b, err := io.ReadAll(io.LimitReader(f, maxRootFile+1))
	if err != nil {
		return nil, err
	}
	if len(b) > maxRootFile {
		return nil, fmt.Errorf("%s in %s: larger than %d bytes", rel, r.name, maxRootFile)
	}
	return b, nil
}
