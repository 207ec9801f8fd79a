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
         lib/systemd/system/attach-agent-drain.service \
         etc/default/attach-agent usr/share/doc/attach-agent/API.md usr/share/doc/attach-agent/README.md; do
  test -e "$root/$f" || { echo "check-deb: $deb lacks /$f"; exit 1; }
done
dpkg-deb -f "$deb" Package Version Architecture
"$root/usr/bin/attach-agent" version
units="$root/units"
mkdir "$units"
for u in attach-agent.service attach-agent.socket attach-agent-drain.service; do
  sed "s|/usr/bin/attach-agent|$root/usr/bin/attach-agent|" "$root/lib/systemd/system/$u" > "$units/$u"
done
systemd-analyze verify "$units/attach-agent.service" "$units/attach-agent.socket" "$units/attach-agent-drain.service"
# The units keep sessions across a restart, and the package runs its
# scripts (an upgrade hands over, a removal drains).
grep -qx 'KillMode=process' "$root/lib/systemd/system/attach-agent.service"
grep -qx 'RuntimeDirectoryPreserve=yes' "$root/lib/systemd/system/attach-agent.service"
ctl=$(mktemp -d)
dpkg-deb -e "$deb" "$ctl"
for s in preinst postinst prerm postrm; do
  test -x "$ctl/$s" || { echo "check-deb: $deb lacks the $s script"; exit 1; }
  sh -n "$ctl/$s"
done
grep -q 'systemctl try-restart attach-agent.service' "$ctl/postinst"
grep -q 'attach-agent drain' "$ctl/prerm"
rm -rf "$ctl"
echo "check-deb: $deb ok"
