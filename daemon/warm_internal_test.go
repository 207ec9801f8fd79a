package daemon

import (
	"crypto/tls"
	"testing"

	"github.com/attach-agent/attach-agent/tlsdial"
)

// A spare's warm-up runs the real paths, not a failure taken for one: the
// made-up order passes specFor, and the dial to the relay in miniature
// pairs, over TLS and plain.
func TestWarmUpPathsSucceed(t *testing.T) {
	if err := warmOrder(DefaultConfig(), make([]byte, 32)); err != nil {
		t.Errorf("warmOrder: %v", err)
	}
	for _, dial := range []tlsdial.Config{
		{TLS: &tls.Config{MinVersion: tls.VersionTLS13}},
		{TLS: nil}, // system roots: the throwaway certificate replaces them
		{Plain: true},
	} {
		if err := warmDial(dial); err != nil {
			t.Errorf("warmDial (plain %v): %v", dial.Plain, err)
		}
	}
}
