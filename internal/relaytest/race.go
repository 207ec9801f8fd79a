//go:build race

package relaytest

// RaceSlowdown is how much slower code runs under the race detector (its
// documentation: 2-20x; TLS handshakes here about 8x). A test whose
// subject is not time (500 pairs held at once, say) scales its clients'
// time bounds by it, so that a race-built run on a busy machine tests the
// same thing.
const RaceSlowdown = 8
