package daemon

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net"
	"os/exec"
	"time"
)

// warmUp runs, in a spare worker waiting for its order, what a session's
// start runs first in a fresh process: a TLS handshake (client and server
// over an in-memory pipe, the certificate verified as a relay's is), so that
// the code is paged in and the crypto tables are built before a client
// waits on them; then a process start, as the command's will be. Best
// effort: a failure only leaves the worker cold.
func warmUp(client *tls.Config) {
	defer func() {
		cmd := exec.Command("/proc/self/exe", warmArg) // this binary, which exits at once (Main)
		cmd.Stdin, cmd.Stdout, cmd.Stderr = nil, nil, nil
		_ = cmd.Run()
	}()
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
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	deadline := time.Now().Add(2 * time.Second)
	_ = a.SetDeadline(deadline)
	_ = b.SetDeadline(deadline)
	srv := tls.Server(b, &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}}})
	done := make(chan struct{})
	go func() { defer close(done); _ = srv.Handshake() }()
	_ = tls.Client(a, cc).Handshake()
	<-done
}
