//go:build !race

package relaytest

// RaceSlowdown is 1 without the race detector (see race.go).
const RaceSlowdown = 1
