// Package testroot finds what tests need to build a container's root
// filesystem: a statically linked busybox, the one program such a root
// needs, and the probe of system calls a hostile tenant would try. Where
// busybox is missing, tests skip, except under CI (CI set), where .ci/run
// installs it and a skip would hide the tests.
package testroot

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// Busybox returns the path of a statically linked busybox.
func Busybox(t testing.TB) string {
	t.Helper()
	missing := func(why string) {
		if os.Getenv("CI") != "" {
			t.Fatalf("%s: .ci/run installs busybox-static", why)
		}
		t.Skipf("%s: apt-get install busybox-static", why)
	}
	bb, err := exec.LookPath("busybox")
	if err != nil {
		missing("no busybox")
	}
	// A dynamic one would not run in a root without its libraries.
	if out, err := exec.Command("ldd", bb).CombinedOutput(); err == nil && !strings.Contains(string(out), "not a dynamic") {
		missing(bb + " is not statically linked")
	}
	return bb
}

// Root is a root filesystem with a static busybox as its only program
// (sh, hostname, cat, sleep and echo linked to it), as root; the test is
// skipped otherwise.
func Root(t testing.TB) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	bb := Busybox(t)
	root := t.TempDir()
	if out, err := exec.Command("sh", "-c", `mkdir -p "$1/bin" && cp "$2" "$1/bin/busybox" && for a in sh hostname cat sleep echo id; do ln -s busybox "$1/bin/$a"; done`,
		"sh", root, bb).CombinedOutput(); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	return root
}

// Probe builds the probe command (statically, so it runs in any root) and
// returns its path.
func Probe(t testing.TB) string {
	t.Helper()
	dir := t.TempDir()
	// Any user a test runs as must reach it.
	for _, d := range []string{dir, filepath.Dir(dir)} {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	out := filepath.Join(dir, "probe")
	cmd := exec.Command("go", "build", "-o", out, "github.com/attach-agent/attach-agent/internal/testroot/probe")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build the probe: %v: %s", err, b)
	}
	return out
}
