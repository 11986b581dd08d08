# shellcheck shell=bash
# machine.sh -- sourced by start-slurm.sh and start-sshd.sh: what the test servers add to this
# machine. apt-get that does not fail on a busy package manager (unattended-upgrades, another
# install, a second test session), and a record of what was added, which tests/infra/cleanup.sh
# removes again.
#
#   apt_install LOG PACKAGE...   install; waits for the apt/dpkg locks first, output to LOG;
#                                on failure prints ONE line (the E: line and LOG) to stderr, rc 1;
#                                records the packages that were not installed before
#   wait_for_apt_locks           wait until no process holds an apt/dpkg lock
#   record_added WHAT...         add a line ("package munge", "user sshtest") to the record
#
# apt and dpkg take fcntl (POSIX) locks on these files, which `flock` does not see; we read the
# kernel's lock table (/proc/locks), which lists both kinds, and name the holder while waiting.
#   APT_LOCK_WAIT_S   how long to wait for the locks, in seconds (default 600)
#   APT_LOCK_FILES    the lock files (default: the four apt-get install/update take)
#   MQI_TESTS_RECORD  the record (default /var/lib/mqi-communicator-tests/added)

APT_LOCK_WAIT_S=${APT_LOCK_WAIT_S:-600}
APT_LOCK_FILES=${APT_LOCK_FILES:-/var/lib/dpkg/lock-frontend /var/lib/dpkg/lock /var/cache/apt/archives/lock /var/lib/apt/lists/lock}

MQI_TESTS_RECORD=${MQI_TESTS_RECORD:-/var/lib/mqi-communicator-tests/added}

record_added() {
    mkdir -p "$(dirname "$MQI_TESTS_RECORD")" || return 0
    grep -qxF "$*" "$MQI_TESTS_RECORD" 2>/dev/null || echo "$*" >>"$MQI_TESTS_RECORD"
}

_apt_say() { printf '[%s] %s\n' "${APT_LOG_TAG:-apt}" "$*" >&2; }

# apt_lock_holder: "PID (COMMAND) on FILE" of the first process holding one of the lock files,
# or nothing (rc 1) when all are free.
apt_lock_holder() {
    local f dev ino key _n arrow _a _b pid id _rest
    for f in $APT_LOCK_FILES; do
        [ -e "$f" ] || continue
        # /proc/locks identifies a file as MAJ:MIN:INODE (hex major/minor, decimal inode)
        dev=$(stat -c '%D' "$f") || continue
        ino=$(stat -c '%i' "$f") || continue
        # (stat's %D is the user-space dev_t: major in bits 8-19, minor in bits 0-7 and 20-31)
        key=$(printf '%02x:%02x:%s' $(((0x$dev >> 8) & 0xfff)) $(((0x$dev & 0xff) | ((0x$dev >> 12) & 0xfff00))) "$ino")
        # "1: POSIX  ADVISORY  WRITE 1234 08:01:5678 0 EOF"; blocked waiters ("1: -> ...") do not count
        while read -r _n arrow _a _b pid id _rest; do
            [ "$arrow" = "->" ] && continue
            [ "$id" = "$key" ] || continue
            [ "$pid" = $$ ] && continue
            printf '%s (%s) on %s\n' "$pid" "$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | cut -c1-80)" "$f"
            return 0
        done </proc/locks
    done
    return 1
}

_APT_DEADLINE=""

# wait_for_apt_locks: rc 0 once the locks are free, rc 2 when still held at the deadline (one
# deadline, APT_LOCK_WAIT_S after the first wait, for all apt-get calls of this script).
wait_for_apt_locks() {
    local holder deadline said=0
    [ -n "$_APT_DEADLINE" ] || _APT_DEADLINE=$(($(date +%s) + APT_LOCK_WAIT_S))
    deadline=$_APT_DEADLINE
    while holder=$(apt_lock_holder); do
        if [ "$said" = 0 ]; then
            _apt_say "the package manager is busy: pid $holder; waiting up to ${APT_LOCK_WAIT_S} s for it"
            said=1
        fi
        if [ "$(date +%s)" -ge "$deadline" ]; then
            _apt_say "ERROR: apt/dpkg still locked after ${APT_LOCK_WAIT_S} s by pid $holder (set APT_LOCK_WAIT_S to wait longer)"
            return 2
        fi
        sleep 1
    done
    [ "$said" = 1 ] && _apt_say "package manager free again"
    return 0
}

# _apt_get LOG ARGS...: apt-get after waiting for the locks; apt itself also waits (for the dpkg
# lock) whatever time is left, in case another process takes it between our check and apt's.
_apt_get() {
    local log=$1
    shift
    wait_for_apt_locks || return 2
    local left=$((_APT_DEADLINE - $(date +%s)))
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=$((left > 1 ? left : 1)) "$@" >>"$log" 2>&1
}

apt_install() {
    local log=$1 rc=0 why p new=()
    shift
    for p in "$@"; do
        [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" = "install ok installed" ] || new+=("$p")
    done
    : >"$log"
    _apt_get "$log" install -y -q --no-install-recommends "$@" || rc=$?
    if [ "$rc" != 0 ] && [ "$rc" != 2 ]; then
        # stale or missing package lists: refresh them once, then retry
        rc=0
        _apt_get "$log" update -q || rc=$?
        [ "$rc" = 2 ] || { rc=0 && _apt_get "$log" install -y -q --no-install-recommends "$@"; } || rc=$?
    fi
    if [ "$rc" = 0 ]; then
        for p in "${new[@]}"; do record_added "package $p"; done
        return 0
    fi
    [ "$rc" = 2 ] && return 1 # wait_for_apt_locks said why
    why=$(grep -E "^E: " "$log" | tail -n 1) || true
    _apt_say "ERROR: apt-get install $* failed: ${why:-exit $rc} (full log: $log)"
    return 1
}
