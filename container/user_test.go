package container

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestLookupUser(t *testing.T) {
	root := t.TempDir()
	if err := os.MkdirAll(filepath.Join(root, "etc"), 0o755); err != nil {
		t.Fatal(err)
	}
	passwd := "# comment\n\nroot:x:0:0:root:/root:/bin/bash\napp:x:1000:1000:App:/home/app:/bin/sh\nshort:x:5\n42:x:1042:100::/srv:/bin/false\n"
	group := "root:x:0:\napp:x:1000:\nstaff:x:50:app,ops\nweb:x:60:ops, app\n1234:x:77:\n"
	for name, body := range map[string]string{"etc/passwd": passwd, "etc/group": group} {
		if err := os.WriteFile(filepath.Join(root, name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	for _, tc := range []struct {
		spec string
		want Identity
		err  string
	}{
		{spec: "app", want: Identity{Name: "app", UID: 1000, GID: 1000, Groups: []uint32{1000, 50}, Home: "/home/app", Shell: "/bin/sh"}},
		{spec: "1000", want: Identity{Name: "app", UID: 1000, GID: 1000, Groups: []uint32{1000, 50}, Home: "/home/app", Shell: "/bin/sh"}},
		{spec: "app:staff", want: Identity{Name: "app", UID: 1000, GID: 50, Groups: []uint32{50}, Home: "/home/app", Shell: "/bin/sh"}},
		{spec: "app:60", want: Identity{Name: "app", UID: 1000, GID: 60, Groups: []uint32{60, 50}, Home: "/home/app", Shell: "/bin/sh"}},
		// A group named by digits is the group of that name, not that gid.
		{spec: "app:1234", want: Identity{Name: "app", UID: 1000, GID: 77, Groups: []uint32{77, 50}, Home: "/home/app", Shell: "/bin/sh"}},
		{spec: "5000:5000", want: Identity{UID: 5000, GID: 5000, Groups: []uint32{5000}, Home: "/"}},
		// A user named by digits, found by name first.
		{spec: "42", want: Identity{Name: "42", UID: 1042, GID: 100, Groups: []uint32{100}, Home: "/srv", Shell: "/bin/false"}},
		{spec: "5000", err: "uid 5000 has no entry"},
		{spec: "ghost", err: `"ghost": no such user in ` + root + "/etc/passwd"},
		{spec: "app:ghosts", err: `group "ghosts": no such group`},
		{spec: "short", err: "no such user"},
		{spec: "app:", err: "want NAME, UID"},
		{spec: ":0", err: "want NAME, UID"},
		{spec: "a:b:c", err: "more colons"},
		{spec: "", err: "empty"},
		{spec: "4294967295:1", err: "want a number from 0 to 4294967294"},
	} {
		got, err := LookupUser(tc.spec, root)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("%q: err %v, want %q", tc.spec, err, tc.err)
			}
			continue
		}
		if err != nil || !reflect.DeepEqual(got, tc.want) {
			t.Errorf("%q: got %+v, %v; want %+v", tc.spec, got, err, tc.want)
		}
	}
	// No passwd file at all: a clear error, not root.
	if _, err := LookupUser("app", t.TempDir()); err == nil || !strings.Contains(err.Error(), "passwd") {
		t.Errorf("missing passwd: %v", err)
	}
}

func TestIdentityEnv(t *testing.T) {
	id := Identity{Name: "app", Home: "/home/app", Shell: "/bin/sh"}
	got := id.Env([]string{"HOME=/custom", "X=1"})
	want := []string{"HOME=/custom", "X=1", "USER=app", "LOGNAME=app", "SHELL=/bin/sh"}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("got %q, want %q", got, want)
	}
}

// A tenant's image decides what its /etc/passwd is: every lookup stays
// inside its root and reads only a regular file, at once.
func TestLookupUserHostileRoot(t *testing.T) {
	mk := func(t *testing.T) string {
		root := t.TempDir()
		if err := os.MkdirAll(filepath.Join(root, "etc"), 0o755); err != nil {
			t.Fatal(err)
		}
		return root
	}
	t.Run("absolute symlink resolves inside", func(t *testing.T) {
		root := mk(t)
		// On the host /srv/passwd is not this file; inside the root it is.
		if err := os.MkdirAll(filepath.Join(root, "srv"), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(root, "srv/passwd"), []byte("tenant:x:4242:4242::/:/bin/sh\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink("/srv/passwd", filepath.Join(root, "etc/passwd")); err != nil {
			t.Fatal(err)
		}
		id, err := LookupUser("tenant:4242", root)
		if err != nil || id.UID != 4242 {
			t.Fatalf("got %+v, %v: want the root's own file through its link", id, err)
		}
		// A link to the host's passwd names a file the root does not have.
		if err := os.Remove(filepath.Join(root, "etc/passwd")); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink("/../../../../etc/passwd", filepath.Join(root, "etc/passwd")); err != nil {
			t.Fatal(err)
		}
		if id, err := LookupUser("root", root); err == nil {
			t.Fatalf("found %+v through a link out of the root", id)
		}
	})
	t.Run("fifo fails at once", func(t *testing.T) {
		root := mk(t)
		if err := syscall.Mkfifo(filepath.Join(root, "etc/passwd"), 0o644); err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() { _, err := LookupUser("app", root); done <- err }()
		select {
		case err := <-done:
			if err == nil || !strings.Contains(err.Error(), "not a regular file") {
				t.Errorf("err %v: want 'not a regular file'", err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("the lookup blocked on a FIFO")
		}
	})
	t.Run("device node is not opened", func(t *testing.T) {
		if os.Geteuid() != 0 {
			t.Skip("needs root (mknod)")
		}
		root := mk(t)
		// /dev/zero: opening it would succeed and reading would never end.
		if err := syscall.Mknod(filepath.Join(root, "etc/passwd"), syscall.S_IFCHR|0o644, 1<<8|5); err != nil {
			t.Fatal(err)
		}
		if _, err := LookupUser("app", root); err == nil || !strings.Contains(err.Error(), "not a regular file") {
			t.Errorf("err %v: want 'not a regular file'", err)
		}
	})
	t.Run("endless file is refused", func(t *testing.T) {
		root := mk(t)
		if err := os.WriteFile(filepath.Join(root, "etc/passwd"), make([]byte, maxRootFile+1), 0o644); err != nil {
			t.Fatal(err)
		}
		if _, err := LookupUser("app", root); err == nil || !strings.Contains(err.Error(), "larger than") {
			t.Errorf("err %v: want a size bound", err)
		}
	})
}
