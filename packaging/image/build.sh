#!/usr/bin/env bash
# Builds the FROM scratch image (packaging/image/Containerfile) into
# dist/attach-agent-image.tar (an OCI archive, for `skopeo copy` or
# `podman load` to a registry), with buildah from Debian's packages: no
# daemon, no registry pull (scratch has no base). Then checks it: one layer
# holding only the binary, its entrypoint, and the binary run from the
# unpacked image as the only thing in its root.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PATH="$PATH:/usr/local/go/bin"
VERSION="${VERSION:-0.1.0}"
ctx=$(mktemp -d)
store=$(mktemp -d)
trap 'buildah --root "$store/root" --runroot "$store/run" --storage-driver vfs rm --all >/dev/null 2>&1 || true; rm -rf "$ctx" "$store"' EXIT
CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.version=$VERSION" -o "$ctx/attach-agent" ./cmd/attach-agent
cp packaging/image/Containerfile "$ctx/"
mkdir -p dist
b=(buildah --root "$store/root" --runroot "$store/run" --storage-driver vfs)
"${b[@]}" bud --quiet --isolation chroot --layers=false -f "$ctx/Containerfile" -t "attach-agent:$VERSION" "$ctx" >/dev/null
rm -f dist/attach-agent-image.tar
"${b[@]}" push --quiet "attach-agent:$VERSION" "oci-archive:dist/attach-agent-image.tar:attach-agent:$VERSION"

# Check what was built, from the archive alone.
oci=$(mktemp -d)
trap 'buildah --root "$store/root" --runroot "$store/run" --storage-driver vfs rm --all >/dev/null 2>&1 || true; rm -rf "$ctx" "$store" "$oci"' EXIT
tar -xf dist/attach-agent-image.tar -C "$oci"
umoci unpack --rootless --image "$oci:attach-agent:$VERSION" "$oci/bundle" >/dev/null
files=$(cd "$oci/bundle/rootfs" && find . -type f | sort)
if [ "$files" != "./usr/bin/attach-agent" ]; then
  echo "image: want the binary alone in the root, found:"; echo "$files"; exit 1
fi
grep -q '"/usr/bin/attach-agent"' "$oci/bundle/config.json" || { echo "image: no entrypoint"; exit 1; }
# Static: it runs in a root that has nothing else.
chroot "$oci/bundle/rootfs" /usr/bin/attach-agent version
ls -l dist/attach-agent-image.tar
