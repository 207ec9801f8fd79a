#!/usr/bin/env bash
# Checks a built .deb: the files it must hold, a binary that runs, and
# units that `systemd-analyze verify` accepts (ExecStart pointed at the
# binary from the package, so the check needs nothing installed).
set -euo pipefail
deb="${1:?usage: check-deb.sh dist/attach-agent_VERSION_ARCH.deb}"
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
dpkg-deb -x "$deb" "$root"
for f in usr/bin/attach-agent lib/systemd/system/attach-agent.service lib/systemd/system/attach-agent.socket \
         etc/default/attach-agent usr/share/doc/attach-agent/API.md usr/share/doc/attach-agent/README.md; do
  test -e "$root/$f" || { echo "check-deb: $deb lacks /$f"; exit 1; }
done
dpkg-deb -f "$deb" Package Version Architecture
"$root/usr/bin/attach-agent" version
units="$root/units"
mkdir "$units"
for u in attach-agent.service attach-agent.socket; do
  sed "s|/usr/bin/attach-agent|$root/usr/bin/attach-agent|" "$root/lib/systemd/system/$u" > "$units/$u"
done
systemd-analyze verify "$units/attach-agent.service" "$units/attach-agent.socket"
echo "check-deb: $deb ok"
