package daemon

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"
)

// The daemon and a worker talk in JSON lines over a unix stream: the
// socket pair the daemon started the worker with, or the worker's control
// socket (record's control.sock) for a daemon that adopted it. Unknown
// fields and message types are ignored, so that a daemon and a worker a
// version apart still understand what both know.
//
//	daemon -> worker  {"type":"setup","config":{...}}        first, at the worker's start (pair only), with
//	                                                         the name of its record's place and the newest
//	                                                         TLS session tickets per relay
//	daemon -> worker  {"type":"wake"}                         a spare's order is coming: the API is reading
//	                                                         the request (pair only; none, one or more)
//	daemon -> worker  {"type":"order","order":{...}}         a session to run (pair only; the secret is in it),
//	                                                         with the newest TLS session ticket for its relay
//	                                                         when the setup gave none for it
//	worker -> daemon  {"type":"accepted","record":{...}}     the record is in place, the session runs
//	worker -> daemon  {"type":"refused","error":"..."}       it does not, and the worker exits
//	worker -> daemon  {"type":"hello","record":{...}}        to each daemon on its control socket
//	worker -> daemon  {"type":"running"}                     the first output byte went out (with the
//	                                                         relay's TLS session ticket, for the next)
//	daemon -> worker  {"type":"end","cause":"killed"}        or "shutdown": end the session so
//	worker -> daemon  {"type":"ended","result":{...}}        result.json is written; the worker exits
type message struct {
	V      int     `json:"v"`
	Type   string  `json:"type"`
	Config *Config `json:"config,omitempty"`
	Key    []byte  `json:"key,omitempty"`  // with setup: the host's key for secret hashes
	Warm   bool    `json:"warm,omitempty"` // with setup: a spare, to warm up before it waits
	Nice   *int    `json:"nice,omitempty"` // with setup: the priority to take before it waits (nice.go)
	// With setup: the name in the sessions directory under which the
	// worker makes its record before its order (record.go, placePrefix),
	// and the newest TLS session per relay name, for its dial.
	Place   string            `json:"place,omitempty"`
	Tickets map[string][]byte `json:"tickets,omitempty"`
	Order   *order            `json:"order,omitempty"`
	Record  *record           `json:"record,omitempty"`
	Result  *result           `json:"result,omitempty"`
	Cause   string            `json:"cause,omitempty"`
	Error   string            `json:"error,omitempty"`
	// With running (worker to daemon) and order (daemon to worker): a TLS
	// session with the session's relay (tlsdial.Tickets), so that a fresh
	// worker's dial is not a full handshake.
	Ticket []byte `json:"ticket,omitempty"`
}

// order is a session for a worker: the request as the API took it (the
// worker reads it with the same specFor), and what the daemon decided.
type order struct {
	ID       string  `json:"id"`
	Request  Request `json:"request"`
	Caller   *Caller `json:"caller,omitempty"`
	DenyRoot bool    `json:"deny_root"`
}

// Causes of an end message.
const (
	causeKilled   = "killed"
	causeShutdown = "shutdown"
)

// maxMessage bounds one message (an order holds a request of at most
// MaxRequestBody).
const maxMessage = 2*MaxRequestBody + 64<<10

// link is one end of a daemon-worker connection.
type link struct {
	c   *net.UnixConn
	r   *bufio.Scanner
	wmu sync.Mutex
}

func newLink(c *net.UnixConn) *link {
	r := bufio.NewScanner(c)
	r.Buffer(make([]byte, 0, 4096), maxMessage)
	return &link{c: c, r: r}
}

// send writes one message, bounded so that a stuck peer cannot hold us.
func (l *link) send(m message) error {
	m.V = recordVersion
	b, err := json.Marshal(m)
	if err != nil {
		return err
	}
	l.wmu.Lock()
	defer l.wmu.Unlock()
	_ = l.c.SetWriteDeadline(time.Now().Add(5 * time.Second))
	_, err = l.c.Write(append(b, '\n'))
	return err
}

// recv reads the next message.
func (l *link) recv() (message, error) {
	var m message
	if !l.r.Scan() {
		if err := l.r.Err(); err != nil {
			return m, err
		}
		return m, errors.New("connection closed")
	}
	if err := json.Unmarshal(l.r.Bytes(), &m); err != nil {
		return m, fmt.Errorf("bad message: %w", err)
	}
	return m, nil
}

func (l *link) close() { _ = l.c.Close() }

// peerIs reports whether the other end of c runs as uid.
func peerIs(c *net.UnixConn, uid int) bool {
	cred, err := peerCred(c)
	return err == nil && int(cred.Uid) == uid
}
