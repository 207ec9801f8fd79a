package main

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/attach-agent/attach-agent/internal/proctest"
	"github.com/attach-agent/attach-agent/internal/relaytest"
)

// attach and connect over protocol v2 (the URL's #v2): stdout and stderr
// arrive apart, the remote status is connect's exit code with no marker,
// and a signal is 128+N.
func TestConnectV2(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	bin := buildAgent(t)
	relay := relaytest.Start(t, nil)
	ca := relay.CAFile(t)
	for i, tc := range []struct {
		script, out, errOut string
		code                int
	}{
		{"echo out; echo err >&2; exit 3", "out\n", "err\n", 3},
		{"echo bye; kill -TERM $$", "bye\n", "", 128 + 15},
	} {
		secret := "v2-connect-" + string(rune('a'+i))
		url := "rendezvous://" + relay.URL(secret).Addr() + "/" + secret + "#v2"
		agent := exec.Command(bin, "attach", "--ca", ca, "--no-tty", "--", "/bin/sh", "-c", tc.script)
		agent.Env = append(os.Environ(), "ATTACH_URL="+url)
		var agentErr proctest.Buffer
		agent.Stderr = &agentErr
		if err := agent.Start(); err != nil {
			t.Fatal(err)
		}
		connect := exec.Command(bin, "connect", "--ca", ca)
		connect.Env = append(os.Environ(), "ATTACH_URL="+url)
		var out, errOut bytes.Buffer
		connect.Stdout, connect.Stderr = &out, &errOut
		err := connect.Run()
		code := 0
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			code = ee.ExitCode()
		} else if err != nil {
			t.Fatal(err)
		}
		_ = agent.Wait()
		if code != tc.code || out.String() != tc.out || !strings.Contains(errOut.String(), tc.errOut) || strings.Contains(out.String(), "heroku-command-exit-status") {
			t.Errorf("%s: exit %d, stdout %q, stderr %q; want %d, %q, %q (agent: %s)", tc.script, code, out.String(), errOut.String(), tc.code, tc.out, tc.errOut, agentErr.String())
		}
	}
}
