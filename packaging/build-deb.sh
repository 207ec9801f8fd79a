#!/usr/bin/env bash
# Builds dist/attach-agent_VERSION_ARCH.deb from this checkout: the binary,
# the systemd units, the defaults file and the docs. nfpm is pinned and run
# with `go run`, so nothing but Go is needed.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/go/bin"
NFPM=github.com/goreleaser/nfpm/v2/cmd/nfpm@v2.44.0
export VERSION="${VERSION:-0.1.0}"
export GOARCH="${GOARCH:-$(go env GOARCH)}"
BUILD_DIR=dist/build # packaging/nfpm.yaml reads the binary from here
mkdir -p "$BUILD_DIR" dist
CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.version=$VERSION" -o "$BUILD_DIR/attach-agent" ./cmd/attach-agent
GOFLAGS=-mod=mod go run "$NFPM" package --config packaging/nfpm.yaml --packager deb --target dist/
ls dist/*.deb
