#!/usr/bin/env bash
# cleanup.sh -- remove from this machine what the test suite added (run as root):
#   - stops the test SLURM (tests/infra/slurm/stop-slurm.sh --purge: daemons, /etc/slurm/*.conf
#     it wrote, /tmp/mqi-slurm) and every test sshd still running from /tmp/mqi-sshd-*;
#   - purges the Debian packages the tests installed (munge, slurmctld, slurmd, slurm-client,
#     openssh-server, zstd: only those that were not installed before, as recorded by
#     tests/infra/machine.sh in /var/lib/mqi-communicator-tests/added) and the dependencies
#     apt installed with them (apt-get purge --autoremove);
#   - deletes the user the sshd tests created (sshtest, with its home).
#   tests/infra/cleanup.sh --dry-run    only say what would be removed
set -uo pipefail
HERE=$(dirname "$(readlink -f "$0")")
# shellcheck source=tests/infra/machine.sh
. "$HERE/machine.sh"
DRY=0
[ "${1:-}" = --dry-run ] && DRY=1
say() { printf '[cleanup] %s\n' "$*"; }
run() {
    say "$*"
    [ "$DRY" = 1 ] || "$@"
}
[ "$(id -u)" = 0 ] || [ "$DRY" = 1 ] || {
    say "must run as root"
    exit 1
}

run bash "$HERE/slurm/stop-slurm.sh" --purge
for d in /tmp/mqi-sshd-*/; do
    [ -f "$d/sshd_config" ] && run bash "$HERE/ssh/stop-sshd.sh" "${d%/}"
done

if [ ! -f "$MQI_TESTS_RECORD" ]; then
    say "no record of packages or users the tests added ($MQI_TESTS_RECORD): nothing more to remove"
    exit 0
fi
mapfile -t packages < <(awk '$1 == "package" { print $2 }' "$MQI_TESTS_RECORD")
mapfile -t users < <(awk '$1 == "user" { print $2 }' "$MQI_TESTS_RECORD")
if ((${#packages[@]})); then
    wait_for_apt_locks || exit 1
    export DEBIAN_FRONTEND=noninteractive
    run apt-get purge -y -q --autoremove "${packages[@]}"
fi
for u in "${users[@]}"; do
    getent passwd "$u" >/dev/null && run userdel --remove "$u"
done
[ -d /etc/slurm ] && [ -z "$(ls -A /etc/slurm)" ] && run rmdir /etc/slurm
[ "$DRY" = 1 ] || rm -f "$MQI_TESTS_RECORD"
say "done"
