package daemon

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"io"
	"math/big"
	"net"
	"os/exec"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/attach-agent/attach-agent/tlsdial"
	"github.com/attach-agent/attach-agent/wire"
)

// warmUp runs, in a spare worker waiting for its order, what a session's
// start runs first in a fresh process, so that the code is paged in and
// the tables are built before a client waits on them:
//   - an order read as a real one is (warmOrder);
//   - the relay's dial, tlsdial's own, to a relay in miniature on loopback
//     (TCP connect, the TLS handshake with the certificate verified as a
//     relay's is, the secret and the ack);
//   - a fork whose exec fails: the command's start is a fork and exec, and
//     a real exec of anything would cost a whole process start (here a Go
//     runtime's) for nothing the session uses.
//
// Best effort: a failure only leaves the worker colder.
func warmUp(cfg Config, hostKey []byte, dial tlsdial.Config) {
	_ = warmOrder(cfg, hostKey)
	_ = warmDial(dial)
	// No such file: /proc/self/exe is not a directory. The child fails
	// its exec and exits; os/exec reports that from the fork.
	_ = exec.Command("/proc/self/exe/warm-up").Run()
}

// warmSecret is the miniature relay's secret.
const warmSecret = "warm-up"

// warmDial dials a relay in miniature, served here on loopback, with dial's
// settings and a throwaway certificate in place of the relay's roots, and
// pairs with it. The port is open to every local user for the moment it
// takes: the server serves only the connection our own dial made (its
// source port, bound before the connect), reads a line of the secret's
// length and no more, and every step has the same 1 s bound.
func warmDial(dial tlsdial.Config) error {
	var srv *tls.Config
	if !dial.Plain {
		var client *tls.Config
		var err error
		if srv, client, err = warmCerts(dial.TLS); err != nil {
			return err
		}
		dial.TLS = client
	}
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		return err // no loopback here: the session's dial goes cold
	}
	defer ln.Close()
	deadline := time.Now().Add(time.Second)
	_ = ln.SetDeadline(deadline)
	var ours atomic.Int32 // our dial's source port
	dial.Control = bindingSource(dial.Control, &ours)
	done := make(chan struct{})
	go func() {
		defer close(done)
		serveWarm(ln, srv, func() int { return int(ours.Load()) }, deadline)
	}()
	ctx, cancel := context.WithDeadline(context.Background(), deadline)
	defer cancel()
	dial.ConnectTimeout, dial.HandshakeTimeout, dial.DialTimeout = time.Second, time.Second, time.Second
	c, err := tlsdial.Dial(ctx, tlsdial.URL{Host: "127.0.0.1", Port: ln.Addr().(*net.TCPAddr).Port, Secret: warmSecret}, dial)
	if err == nil {
		err = c.Pair(ctx, warmSecret, time.Second)
		_ = c.Close()
	}
	_ = ln.Close()
	<-done
	return err
}

// bindingSource is control (nil: none), then a bind of the socket to
// 127.0.0.1 on a port of the kernel's choosing, stored in port before the
// connect goes out: the miniature relay can tell our dial from another's.
func bindingSource(control func(network, address string, rc syscall.RawConn) error, port *atomic.Int32) func(string, string, syscall.RawConn) error {
	return func(network, address string, rc syscall.RawConn) error {
		if control != nil {
			if err := control(network, address, rc); err != nil {
				return err
			}
		}
		var berr error
		err := rc.Control(func(fd uintptr) {
			if berr = unix.Bind(int(fd), &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); berr != nil {
				return
			}
			sa, gerr := unix.Getsockname(int(fd))
			if in4, ok := sa.(*unix.SockaddrInet4); gerr == nil && ok {
				port.Store(int32(in4.Port))
			}
		})
		if err != nil {
			return err
		}
		return berr
	}
}

// serveWarm is the relay in miniature: on ln, until deadline, it closes
// every connection but the one from port ours() and answers that one's
// secret line (TLS with srv, plain when nil) with the ack.
func serveWarm(ln *net.TCPListener, srv *tls.Config, ours func() int, deadline time.Time) {
	for {
		c, err := ln.AcceptTCP()
		if err != nil {
			return
		}
		if c.RemoteAddr().(*net.TCPAddr).Port != ours() {
			_ = c.Close() // not our dial's: someone else's connect
			continue
		}
		defer c.Close()
		_ = c.SetDeadline(deadline)
		var rw net.Conn = c
		if srv != nil {
			rw = tls.Server(c, srv)
		}
		var line [len(warmSecret) + 2]byte
		if _, err := io.ReadFull(rw, line[:]); err == nil && string(line[:]) == warmSecret+"\r\n" {
			_, _ = io.WriteString(rw, wire.Ack)
		}
		return
	}
}

// warmCerts makes a throwaway server certificate and a client
// configuration like base (its curves and versions) that trusts only it.
func warmCerts(base *tls.Config) (srv, client *tls.Config, err error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "warm-up"}, DNSNames: []string{"warm-up.invalid"},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign, BasicConstraintsValid: true, IsCA: true,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, nil, err
	}
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	client = &tls.Config{}
	if base != nil {
		client = base.Clone()
	}
	client.RootCAs, client.ServerName, client.Certificates, client.GetClientCertificate = pool, "warm-up.invalid", nil, nil
	return &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}}}, client, nil
}

// warmOrder reads a made-up order as runWorker reads a real one, writing,
// dialling and starting nothing: the JSON of the messages and the record,
// specFor, the secret's hash. (Writing a record in a scratch directory as
// well was measured: 0.3 ms of a spare's CPU on a tmpfs, 1 ms on ext4, for
// nothing seen on the session's path.)
func warmOrder(cfg Config, key []byte) error {
	req := Request{AttachURL: "rendezvous://127.0.0.1:1/" + warmSecret, Command: json.RawMessage(`"true"`), Labels: map[string]string{"warm": "up"}}
	b, err := json.Marshal(message{Type: "order", Order: &order{ID: "s-0000000000000000", Request: req, Caller: &Caller{}}})
	if err != nil {
		return err
	}
	var m message
	if err := json.Unmarshal(b, &m); err != nil {
		return err
	}
	spec, err := specFor(cfg, m.Order.Request)
	if err != nil {
		return err
	}
	rec := record{
		V: recordVersion, ID: m.Order.ID, StartedAt: time.Now(), About: spec.About(),
		SecretHash: secretHash(key, spec.URL.Secret), Place: spec.Container.Place(),
	}
	if _, err := encodeFile(rec); err != nil {
		return err
	}
	_, err = json.Marshal(message{Type: "accepted", Record: &rec})
	return err
}
