package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	stdlibio "io"
	"net"
	"net/http"
	"strconv"
	"time"

	"github.com/attach-agent/attach-agent/daemon"
)

// runDrain asks the daemon to end every session: the running ones may
// finish within the grace, then end with reason shutdown.
func runDrain(ctx context.Context, args []string, io stdio) (int, error) {
	fs := newFlagSet("drain", "[--grace D] [--control PATH]", "attach-agent drain --grace 5m", io.err)
	control := fs.String("control", daemon.DefaultControl, "unix socket `path` of the daemon's control API")
	grace := fs.Duration("grace", 10*time.Minute, "how long running sessions may finish before they end with reason shutdown")
	if err := parse(fs, args); err != nil {
		return exitUsage, err
	}
	if fs.NArg() > 0 {
		return exitUsage, usagef("unexpected argument %q", fs.Arg(0))
	}
	if *grace < 0 {
		return exitUsage, usagef("--grace must not be negative, got %v", *grace)
	}
	c := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", *control)
	}}}
	body, _ := json.Marshal(map[string]string{"grace": grace.String()})
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://attach-agent/v1/drain", bytes.NewReader(body))
	if err != nil {
		return exitFailure, err
	}
	resp, err := c.Do(req)
	if err != nil {
		return exitFailure, fmt.Errorf("the daemon at %s: %w (is attach-agent serve running? --control names its socket)", *control, err)
	}
	defer resp.Body.Close()
	var out struct {
		Error    string        `json:"error"`
		Sessions []daemon.View `json:"sessions"`
		Ended    int           `json:"ended"`
		ByDrain  int           `json:"ended_by_drain"`
	}
	if err := json.NewDecoder(stdlibio.LimitReader(resp.Body, 64<<20)).Decode(&out); err != nil {
		return exitFailure, fmt.Errorf("the daemon's answer: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		return exitFailure, fmt.Errorf("the daemon refused: %s", out.Error)
	}
	for _, v := range out.Sessions {
		code := ""
		if v.ExitCode != nil {
			code = strconv.Itoa(*v.ExitCode)
		}
		fmt.Fprintf(io.out, "%s\t%s\t%s\texit=%s\n", v.ID, v.State, v.Reason, code)
	}
	fmt.Fprintf(io.out, "drained: %d sessions ended, %d of them by the drain (reason shutdown)\n", out.Ended, out.ByDrain)
	return exitOK, nil
}
