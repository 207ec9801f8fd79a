// Package wire is what both ends of a Rendezvous connection share, and
// nothing else: the relay's acknowledgement, the secret's limits and
// fingerprint, the Heroku CLI's exit-status marker (and the filter that
// takes it out of a stream), the batcher that packs writes into TLS
// records, and protocol v2's frames. It works on bytes and on the
// connections it is handed; it dials nothing, starts nothing and knows no
// HTTP, metrics or logs. tlsdial (the dialing side), rendezvous (the
// relay and client) and agent build on it.
package wire

import (
	"crypto/sha256"
	"encoding/hex"
)

// Ack is the line the relay writes to each side once both are there.
const Ack = "rendezvous\r\n"

// MaxSecretLen caps the secret; real secrets are a few dozen bytes.
const MaxSecretLen = 1024

// Fingerprint is what logs, metrics and the API show of a secret: the
// first 12 hex digits of its SHA-256, enough to match a relay's log line,
// nothing to pair with.
func Fingerprint(secret string) string {
	sum := sha256.Sum256([]byte(secret))
	return hex.EncodeToString(sum[:6])
}
