package main

import (
	"crypto/rand"
	"crypto/sha256"
	"fmt"
	"io"
	"sort"
	"time"

	"github.com/attach-agent/attach-agent/tlsdial"
	"github.com/attach-agent/attach-agent/wire"
)

// rawV2 starts command through d over protocol v2 and pairs a client
// that reads and writes frames on the connection itself, as lean as the
// Heroku wire's raw client: the figures are the agent's framing, not a
// client library's plumbing.
func (e *env) rawV2(d *daemon, command string) (*tlsdial.Conn, *wire.FrameReader, error) {
	u := e.url()
	u.V2 = true
	if _, err := d.post(u, command); err != nil {
		return nil, nil, err
	}
	c, err := e.client(u)
	if err != nil {
		return nil, nil, err
	}
	return c, wire.NewFrameReader(c), nil
}

// stdoutFrames feeds the stdout frames' payloads to w until n bytes came
// (n < 0: until the exit frame), answering pings.
func stdoutFrames(c *tlsdial.Conn, fr *wire.FrameReader, w io.Writer, n int64) (int64, error) {
	var got int64
	for n < 0 || got < n {
		t, p, err := fr.Next()
		if err != nil {
			return got, err
		}
		switch t {
		case wire.FrameStdout:
			_, _ = w.Write(p)
			got += int64(len(p))
		case wire.FramePing:
			_, _ = c.Write(wire.AppendFrame(nil, wire.FramePong, p))
		case wire.FrameExit:
			if n < 0 {
				return got, nil
			}
		}
	}
	return got, nil
}

func (e *env) v2Download(d *daemon, size int64) (float64, error) {
	c, fr, err := e.rawV2(d, fmt.Sprintf("head -c %d /dev/zero", size))
	if err != nil {
		return 0, err
	}
	defer c.Close()
	t0 := time.Now()
	n, err := stdoutFrames(c, fr, io.Discard, -1)
	if err != nil || n != size {
		return 0, fmt.Errorf("v2 download: %d of %d bytes: %v", n, size, err)
	}
	return float64(size) / (1 << 20) / time.Since(t0).Seconds(), nil
}

func (e *env) v2Echo(d *daemon, size int64) (float64, error) {
	c, fr, err := e.rawV2(d, "cat")
	if err != nil {
		return 0, err
	}
	defer c.Close()
	data := make([]byte, size)
	_, _ = rand.Read(data)
	t0 := time.Now()
	go func() {
		fw := &wire.FrameWriter{W: c}
		for p := data; len(p) > 0; {
			k := min(len(p), 32<<10-wire.HeaderLen) // a frame fills two TLS records
			if fw.Write(wire.FrameStdin, p[:k]) != nil {
				return
			}
			p = p[k:]
		}
	}()
	h := sha256.New()
	if n, err := stdoutFrames(c, fr, h, size); err != nil {
		return 0, fmt.Errorf("v2 echo stalled or broke at %d of %d bytes: %w", n, size, err)
	}
	el := time.Since(t0)
	if want := sha256.Sum256(data); string(h.Sum(nil)) != string(want[:]) {
		return 0, fmt.Errorf("v2 echo differs (sha256)")
	}
	return float64(size) / (1 << 20) / el.Seconds(), nil
}

// v2Latency is latency's round trip over v2 frames, with the client as
// lean as the Heroku-wire one: frames written and read on the connection
// itself.
func (e *env) v2Latency(d *daemon, trips int) (p50, p99 time.Duration, err error) {
	c, fr, err := e.rawV2(d, "cat")
	if err != nil {
		return 0, 0, err
	}
	defer c.Close()
	frame := wire.AppendFrame(nil, wire.FrameStdin, []byte{'x'})
	lat := make([]time.Duration, 0, trips)
	for range trips {
		t0 := time.Now()
		if _, err := c.Write(frame); err != nil {
			return 0, 0, err
		}
		for got := false; !got; {
			t, p, err := fr.Next()
			if err != nil {
				return 0, 0, err
			}
			switch t {
			case wire.FrameStdout:
				got = len(p) > 0
			case wire.FramePing:
				_, _ = c.Write(wire.AppendFrame(nil, wire.FramePong, p))
			}
		}
		lat = append(lat, time.Since(t0))
	}
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	return lat[len(lat)/2], lat[len(lat)*99/100], nil
}

// benchV2 compares protocol v2 with the Heroku wire through one daemon
// (bin's serve), in rounds (inRounds, report).
func benchV2(bin string, tests map[string]bool, downloadMiB, echoMiB, trips, rounds int) error {
	e, cleanup, err := newEnv()
	if err != nil {
		return err
	}
	defer cleanup()
	d, err := e.startDaemon("v2", bin)
	if err != nil {
		return err
	}
	defer d.stop()
	fmt.Printf("protocol v2 against the Heroku wire, one daemon (%s), %s, %d rounds\n\n", bin, time.Now().UTC().Format(time.RFC3339), rounds)
	size, esize := int64(downloadMiB)<<20, int64(echoMiB)<<20
	var ms []measure
	if tests["download"] {
		ms = append(ms, measure{fmt.Sprintf("download (%d MiB, raw pty, MiB/s at the client)", downloadMiB), "target >= 0.95", func(v int) (float64, error) {
			if v == 1 {
				return e.v2Download(d, size)
			}
			return e.daemonDownload(d, size)
		}})
	}
	if tests["echo"] {
		ms = append(ms, measure{fmt.Sprintf("echo-bulk (%d MiB through cat, raw pty, MiB/s at the client)", echoMiB), "target >= 0.95", func(v int) (float64, error) {
			if v == 1 {
				return e.v2Echo(d, esize)
			}
			return e.daemonEcho(d, esize)
		}})
	}
	if tests["latency"] {
		n := max(trips/rounds, 100)
		ms = append(ms, measure{fmt.Sprintf("latency p50 (%d one-byte round trips through cat per round, raw pty, µs)", n), "target <= 1.05", func(v int) (float64, error) {
			var p50 time.Duration
			var err error
			if v == 1 {
				p50, _, err = e.v2Latency(d, n)
			} else {
				p50, _, err = e.daemonLatency(d, n)
			}
			return float64(p50) / float64(time.Microsecond), err
		}})
	}
	got, steal, err := inRounds(rounds, ms)
	if err != nil {
		return err
	}
	for i, m := range ms {
		report(m, [2]string{"Heroku wire (v1)", "protocol v2"}, got[i], steal)
	}
	return nil
}
