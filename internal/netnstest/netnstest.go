// Package netnstest runs a test inside a network namespace of its own, with
// loopback up and TCP buffers capped, standing in for a slow link: the
// test binary re-executes itself there (a namespace is per thread, and the
// sockets of a whole session must be in it). Only the namespace's own
// sysctls are written, never the host's.
package netnstest

import (
	"fmt"
	"os"
	"os/exec"
	"testing"
)

const envMarker = "ATTACH_AGENT_TEST_NETNS"

// SmallBuffers runs the calling test in a new network namespace whose TCP
// send and receive buffers are at most max bytes. It returns true in the
// namespace, where the test goes on; outside it returns false after the
// run there, whose failure fails the test (the caller then returns).
func SmallBuffers(t *testing.T, max int) bool {
	t.Helper()
	if os.Getenv(envMarker) == t.Name() {
		for _, c := range [][]string{{"ip", "link", "set", "lo", "up"}} {
			if out, err := exec.Command(c[0], c[1:]...).CombinedOutput(); err != nil {
				t.Fatalf("%v: %v: %s", c, err, out)
			}
		}
		for _, f := range []string{"tcp_rmem", "tcp_wmem"} {
			v := fmt.Sprintf("4096 %d %d", max, max)
			if err := os.WriteFile("/proc/sys/net/ipv4/"+f, []byte(v), 0); err != nil {
				t.Fatalf("%s in the test's own namespace: %v", f, err)
			}
		}
		return true
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root (a network namespace of its own)")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("no ip (iproute2): .ci/run installs it")
		}
		t.Skip("no ip (iproute2)")
	}
	cmd := exec.Command("unshare", "--net", "--", os.Args[0], "-test.run=^"+t.Name()+"$", "-test.count=1", "-test.v")
	cmd.Env = append(os.Environ(), envMarker+"="+t.Name())
	out, err := cmd.CombinedOutput()
	t.Logf("in a network namespace with %d-byte TCP buffers:\n%s", max, out)
	if err != nil {
		t.Fatalf("the run in the namespace failed: %v", err)
	}
	return false
}
