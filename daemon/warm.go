package daemon

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"io"
	"math/big"
	"net"
	"time"

	"github.com/attach-agent/attach-agent/container"
	"github.com/attach-agent/attach-agent/ptyio"
)

// warmUp runs, in a spare worker waiting for its order, what a session's
// start runs first in a fresh process, so that its code is paged in, its
// crypto tables built and its threads started before a client waits on
// them: a whole session in miniature, on loopback: a TLS connection (the
// certificate verified as a relay's is), the host session's groups, a pty
// and a process started in it (this binary, which exits at once), the pump
// and its drain. Bounded (2 s) and best effort: a failure only leaves the
// worker cold.
func warmUp(client *tls.Config) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "warm-up"}, DNSNames: []string{"warm-up.invalid"},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign, BasicConstraintsValid: true, IsCA: true,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return
	}
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	cc := &tls.Config{RootCAs: pool, ServerName: "warm-up.invalid", MinVersion: tls.VersionTLS12}
	if client != nil {
		cc.CurvePreferences, cc.MinVersion = client.CurvePreferences, max(client.MinVersion, tls.VersionTLS12)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return
	}
	defer ln.Close()
	served := make(chan struct{})
	go func() {
		defer close(served)
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(2 * time.Second))
		_, _ = io.Copy(io.Discard, tls.Server(c, &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}}}))
	}()
	defer func() { _ = ln.Close(); <-served }()
	var d net.Dialer
	raw, err := d.DialContext(ctx, "tcp", ln.Addr().String())
	if err != nil {
		return
	}
	conn := tls.Client(raw, cc)
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(2 * time.Second))
	if conn.HandshakeContext(ctx) != nil {
		return
	}
	ps := ptyio.Spec{Argv: []string{"/proc/self/exe", warmArg}, TTY: true, Raw: true}
	release, err := container.Apply(ctx, container.Spec{}, "", &ps, time.Second)
	if err != nil {
		return
	}
	defer func() { _ = release() }()
	if ps.Terminal, err = ptyio.OpenTerminal(ps); err != nil {
		return
	}
	p, err := ptyio.Start(ps)
	if err != nil {
		ps.Terminal.Close()
		return
	}
	ptyio.Run(ctx, conn, p, ptyio.Config{Linger: 100 * time.Millisecond, DrainTimeout: 500 * time.Millisecond})
}
