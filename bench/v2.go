package main

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"fmt"
	"hash"
	"io"
	"sort"
	"time"

	"github.com/attach-agent/attach-agent/attach"
	"github.com/attach-agent/attach-agent/wire"
)

// v2Session starts command through d over protocol v2 and returns the
// attach client's session, not started.
func (e *env) v2Session(d *daemon, command string) (*attach.Session, error) {
	u := e.url()
	u.V2 = true
	if _, err := d.post(u, command); err != nil {
		return nil, err
	}
	return attach.DialURL(context.Background(), u, attach.Config{Dial: e.dial})
}

// counter counts (and hashes, when h is set) what it is given, and says
// when it has seen want bytes.
type counter struct {
	n, want int64
	h       hash.Hash
	full    chan struct{}
}

func (c *counter) Write(p []byte) (int, error) {
	if c.h != nil {
		c.h.Write(p)
	}
	c.n += int64(len(p))
	if c.full != nil && c.n >= c.want {
		close(c.full)
		c.full = nil
	}
	return len(p), nil
}

func (e *env) v2Download(d *daemon, size int64) (float64, error) {
	s, err := e.v2Session(d, fmt.Sprintf("head -c %d /dev/zero", size))
	if err != nil {
		return 0, err
	}
	defer s.Close()
	c := &counter{}
	s.Stdout = c
	t0 := time.Now()
	if err := s.Start(); err != nil {
		return 0, err
	}
	if err := s.Wait(); err != nil || c.n != size {
		return 0, fmt.Errorf("v2 download: %d of %d bytes: %v", c.n, size, err)
	}
	return float64(size) / (1 << 20) / time.Since(t0).Seconds(), nil
}

func (e *env) v2Echo(d *daemon, size int64) (float64, error) {
	s, err := e.v2Session(d, "cat")
	if err != nil {
		return 0, err
	}
	defer s.Close()
	data := make([]byte, size)
	_, _ = rand.Read(data)
	pr, pw := io.Pipe()
	defer pw.Close()
	c := &counter{want: size, h: sha256.New(), full: make(chan struct{})}
	full := c.full
	s.Stdin, s.Stdout = pr, c
	t0 := time.Now()
	if err := s.Start(); err != nil {
		return 0, err
	}
	go func() { _, _ = pw.Write(data) }()
	select {
	case <-full:
	case <-time.After(2 * time.Minute):
		return 0, fmt.Errorf("v2 echo stalled at %d of %d bytes", c.n, size)
	}
	el := time.Since(t0)
	if want := sha256.Sum256(data); string(c.h.Sum(nil)) != string(want[:]) {
		return 0, fmt.Errorf("v2 echo differs (sha256)")
	}
	return float64(size) / (1 << 20) / el.Seconds(), nil
}

// v2Latency is latency's round trip over v2 frames, with the client as
// lean as the Heroku-wire one: frames written and read on the connection
// itself.
func (e *env) v2Latency(d *daemon, trips int) (p50, p99 time.Duration, err error) {
	u := e.url()
	u.V2 = true
	if _, err := d.post(u, "cat"); err != nil {
		return 0, 0, err
	}
	c, err := e.client(u)
	if err != nil {
		return 0, 0, err
	}
	defer c.Close()
	fr := wire.NewFrameReader(c)
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
// (bin's serve), alternating within each round.
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
	fmt.Printf("protocol v2 against the Heroku wire, one daemon (%s), %s\n\n", bin, time.Now().UTC().Format(time.RFC3339))
	type pair struct{ v1, v2 []float64 }
	var dl, echo pair
	size, esize := int64(downloadMiB)<<20, int64(echoMiB)<<20
	for r := range rounds {
		for k := range 2 {
			v2 := (r+k)%2 == 1
			if tests["download"] {
				var x float64
				if v2 {
					x, err = e.v2Download(d, size)
				} else {
					x, err = e.daemonDownload(d, size)
				}
				if err != nil {
					return err
				}
				if v2 {
					dl.v2 = append(dl.v2, x)
				} else {
					dl.v1 = append(dl.v1, x)
				}
			}
			if tests["echo"] {
				var x float64
				if v2 {
					x, err = e.v2Echo(d, esize)
				} else {
					x, err = e.daemonEcho(d, esize)
				}
				if err != nil {
					return err
				}
				if v2 {
					echo.v2 = append(echo.v2, x)
				} else {
					echo.v1 = append(echo.v1, x)
				}
			}
		}
	}
	for _, m := range []struct {
		name string
		p    pair
		size int
	}{{"download", dl, downloadMiB}, {"echo-bulk", echo, echoMiB}} {
		if len(m.p.v1) == 0 {
			continue
		}
		fmt.Printf("%s (%d MiB, raw pty, MiB/s at the client; median of %d rounds [range])\n", m.name, m.size, rounds)
		fmt.Printf("  %-32s %8.1f [%s]\n", "Heroku wire (v1)", median(m.p.v1), spreadOf(m.p.v1))
		fmt.Printf("  %-32s %8.1f [%s]   %.2fx v1 (target >= 0.95)\n\n", "protocol v2", median(m.p.v2), spreadOf(m.p.v2), median(m.p.v2)/median(m.p.v1))
	}
	if tests["latency"] {
		var lat [2][2]time.Duration
		for _, v := range []int{0, 1, 1, 0} {
			var p50, p99 time.Duration
			if v == 1 {
				p50, p99, err = e.v2Latency(d, trips/2)
			} else {
				p50, p99, err = e.daemonLatency(d, trips/2)
			}
			if err != nil {
				return err
			}
			lat[v][0] += p50 / 2
			lat[v][1] += p99 / 2
		}
		fmt.Printf("latency (%d one-byte round trips through cat, raw pty)\n", trips)
		fmt.Printf("  %-32s p50 %8v   p99 %8v\n", "Heroku wire (v1)", lat[0][0], lat[0][1])
		fmt.Printf("  %-32s p50 %8v   p99 %8v   p50 %.2fx v1 (target <= 1.05)\n\n", "protocol v2", lat[1][0], lat[1][1], float64(lat[1][0])/float64(lat[0][0]))
	}
	return nil
}
