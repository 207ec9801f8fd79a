package daemon

import (
	"bufio"
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
	"time"

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
// pairs with it.
func warmDial(dial tlsdial.Config) error {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err // no loopback here: the session's dial goes cold
	}
	defer ln.Close()
	deadline := time.Now().Add(2 * time.Second)
	var srv *tls.Config
	if !dial.Plain {
		var client *tls.Config
		if srv, client, err = warmCerts(dial.TLS); err != nil {
			return err
		}
		dial.TLS = client
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		_ = c.SetDeadline(deadline)
		rw := c
		if srv != nil {
			rw = tls.Server(c, srv)
		}
		if line, err := bufio.NewReader(rw).ReadString('\n'); err == nil && line == warmSecret+"\r\n" {
			_, _ = io.WriteString(rw, wire.Ack)
		}
	}()
	ctx, cancel := context.WithDeadline(context.Background(), deadline)
	defer cancel()
	dial.ConnectTimeout, dial.HandshakeTimeout, dial.DialTimeout = time.Second, time.Second, time.Second
	port := ln.Addr().(*net.TCPAddr).Port
	c, err := tlsdial.Dial(ctx, tlsdial.URL{Host: "127.0.0.1", Port: port, Secret: warmSecret}, dial)
	if err == nil {
		err = c.Pair(ctx, warmSecret, time.Second)
		_ = c.Close()
	}
	_ = ln.Close()
	<-done
	return err
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
