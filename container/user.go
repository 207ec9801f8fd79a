package container

import (
	"errors"
	"fmt"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"github.com/attach-agent/attach-agent/ptyio"
)

// Identity is who a command runs as, resolved from passwd and group files.
type Identity struct {
	Name   string // login name; empty for a bare uid:gid
	UID    uint32
	GID    uint32
	Groups []uint32 // supplementary groups, the primary one included
	Home   string
	Shell  string
}

// LookupUser resolves spec (NAME, UID, NAME:GROUP or UID:GID, groups by
// name or number) against ROOT/etc/passwd and ROOT/etc/group: the files of
// the filesystem the command will see (a container's, not the host's, when
// it runs in one). A numeric uid with no passwd entry needs an explicit
// group, so that nothing gets group 0 by accident.
func LookupUser(spec, root string) (Identity, error) {
	var id Identity
	if spec == "" {
		return id, errors.New("user: empty: give NAME, UID, NAME:GROUP or UID:GID")
	}
	if root == "" {
		root = "/"
	}
	if err := CheckUserSpec(spec); err != nil {
		return id, fmt.Errorf("user %w", err)
	}
	userPart, groupPart, hasGroup := strings.Cut(spec, ":")
	r, err := openRoot(root)
	if err != nil {
		return id, fmt.Errorf("user %q: %w", spec, err)
	}
	defer r.close()
	passwd, perr := readColonFile(r, "etc/passwd", 7)
	groups, gerr := readColonFile(r, "etc/group", 4)

	var pw []string
	for _, e := range passwd {
		if e[0] == userPart || isNumber(userPart) && e[2] == userPart {
			pw = e
			break
		}
	}
	switch {
	case pw != nil:
		uid, err1 := parseID(pw[2])
		gid, err2 := parseID(pw[3])
		if err1 != nil || err2 != nil {
			return id, fmt.Errorf("user %q: bad passwd entry in %s", userPart, filepath.Join(root, "etc/passwd"))
		}
		id = Identity{Name: pw[0], UID: uid, GID: gid, Home: pw[5], Shell: pw[6]}
	case isNumber(userPart):
		uid, err := parseID(userPart)
		if err != nil {
			return id, fmt.Errorf("user %q: %v", spec, err)
		}
		if !hasGroup {
			return id, fmt.Errorf("user %q: uid %d has no entry in %s: give its group too (%d:GID)",
				spec, uid, filepath.Join(root, "etc/passwd"), uid)
		}
		id = Identity{UID: uid, Home: "/"}
	default:
		if perr != nil {
			return id, fmt.Errorf("user %q: %v", userPart, perr)
		}
		return id, fmt.Errorf("user %q: no such user in %s", userPart, filepath.Join(root, "etc/passwd"))
	}
	if hasGroup {
		gid, err := lookupGroup(groupPart, groups, gerr, root)
		if err != nil {
			return id, fmt.Errorf("user %q: %w", spec, err)
		}
		id.GID = gid
	}
	id.Groups = []uint32{id.GID}
	if id.Name != "" {
		for _, g := range groups {
			for _, m := range strings.Split(g[3], ",") {
				if m == id.Name {
					if gid, err := parseID(g[2]); err == nil && gid != id.GID {
						id.Groups = append(id.Groups, gid)
					}
				}
			}
		}
	}
	return id, nil
}

// CheckUserSpec checks the shape of a user spec without looking it up.
func CheckUserSpec(spec string) error {
	userPart, groupPart, hasGroup := strings.Cut(spec, ":")
	switch {
	case userPart == "" || hasGroup && groupPart == "":
		return fmt.Errorf("%q: want NAME, UID, NAME:GROUP or UID:GID", spec)
	case strings.ContainsAny(spec, " \t\n\x00/") || strings.Count(spec, ":") > 1:
		return fmt.Errorf("%q: a name or number, optionally :GROUP, without spaces, slashes or more colons", spec)
	}
	return nil
}

func lookupGroup(name string, groups [][]string, gerr error, root string) (uint32, error) {
	for _, g := range groups {
		if g[0] == name {
			return parseID(g[2])
		}
	}
	if isNumber(name) {
		return parseID(name)
	}
	if gerr != nil {
		return 0, fmt.Errorf("group %q: %v", name, gerr)
	}
	return 0, fmt.Errorf("group %q: no such group in %s", name, filepath.Join(root, "etc/group"))
}

// Credential is the identity as the kernel takes it.
func (id Identity) Credential() *syscall.Credential {
	return &syscall.Credential{Uid: id.UID, Gid: id.GID, Groups: id.Groups}
}

// Env adds HOME, USER, LOGNAME and SHELL from the identity to env unless
// env already has them.
func (id Identity) Env(env []string) []string {
	out := append([]string(nil), env...)
	add := func(k, v string) {
		if v != "" && !ptyio.HasKey(out, k) {
			out = append(out, k+"="+v)
		}
	}
	add("HOME", id.Home)
	add("USER", id.Name)
	add("LOGNAME", id.Name)
	add("SHELL", id.Shell)
	return out
}

func isNumber(s string) bool {
	if s == "" {
		return false
	}
	for _, c := range s {
		if c < '0' || c > '9' {
			return false
		}
	}
	return true
}

func parseID(s string) (uint32, error) {
	n, err := strconv.ParseUint(s, 10, 32)
	if err != nil || n == 1<<32-1 {
		return 0, fmt.Errorf("id %q: want a number from 0 to 4294967294", s)
	}
	return uint32(n), nil
}

// readColonFile reads an /etc/passwd-style file inside r: entries of at
// least n colon-separated fields; comments, blanks and short lines are
// skipped.
func readColonFile(r *root, rel string, n int) ([][]string, error) {
	b, err := r.readFile(rel)
	if err != nil {
		return nil, err
	}
	var out [][]string
	for _, line := range strings.Split(string(b), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || line[0] == '#' {
			continue
		}
		fields := strings.Split(line, ":")
		if len(fields) >= n {
			out = append(out, fields)
		}
	}
	return out, nil
}
