#!/usr/bin/env bash
# stop-sshd.sh STATE_DIR [--keep] -- stop exactly the sshd that start-sshd.sh started in STATE_DIR.
#
#   1. the listener, by the pid in STATE_DIR/sshd.pid, only after checking that this pid runs
#      with STATE_DIR/sshd_config (a recycled pid is never killed);
#   2. its per-connection processes (sshd sessions, sftp-server), found by parent-pid walk;
#   3. session processes orphaned earlier (listener already gone), found as the owners of
#      established TCP sockets on OUR port (ss -p) and checked to be sshd processes.
# Never kills by name. Removes STATE_DIR unless --keep. Idempotent.
set -euo pipefail
D=${1:?usage: stop-sshd.sh STATE_DIR [--keep]}
KEEP=${2:-}
die() {
    echo "stop-sshd: $*" >&2
    exit 1
}

alive() { # running and not a zombie
    local st
    st=$(awk '{ print $3 }' "/proc/$1/stat" 2>/dev/null) || return 1
    [ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ]
}

descendants() { # all descendants of $1 (ppid walk)
    local c
    for c in $(ps -o pid= --ppid "$1" 2>/dev/null); do
        echo "$c"
        descendants "$c"
    done
}

PORT=$(awk '$1 == "Port" { print $2 }' "$D/sshd_config" 2>/dev/null || true)

orphans() { # sshd processes holding an established connection on our port
    [ -n "$PORT" ] || return 0
    if ! command -v ss >/dev/null; then
        echo "stop-sshd: ss (iproute2) not found: orphaned sessions on port $PORT not looked for" >&2
        return 0
    fi
    ss -Htnp state established "( sport = :$PORT )" 2>/dev/null |
        grep -o 'pid=[0-9]*' | cut -d= -f2 | sort -u | while read -r p; do
        case "$(tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null)" in
            sshd:* | */sshd\ *) echo "$p" ;;
        esac
    done || true
}

kill_list() { # TERM, 1 s grace, KILL (stopped processes get CONT so that TERM lands)
    local k
    [ $# -gt 0 ] || return 0
    for k in "$@"; do kill -TERM "$k" 2>/dev/null || true; done
    for k in "$@"; do kill -CONT "$k" 2>/dev/null || true; done
    for _ in $(seq 50); do
        local any=0
        for k in "$@"; do alive "$k" && any=1; done
        [ "$any" = 0 ] && return 0
        sleep 0.02
    done
    for k in "$@"; do
        if alive "$k"; then kill -KILL "$k" 2>/dev/null || true; fi
    done
    return 0
}

if [ -f "$D/sshd.pid" ]; then
    PID=$(cat "$D/sshd.pid")
    [[ "$PID" =~ ^[0-9]+$ ]] || die "bad pid '$PID' in $D/sshd.pid"
    if alive "$PID"; then
        tr '\0' ' ' <"/proc/$PID/cmdline" | grep -qF -- "$D/sshd_config" ||
            die "pid $PID is not the sshd of $D (pid recycled?): not killing"
        KIDS=$(descendants "$PID" | sort -u)
        # shellcheck disable=SC2086
        kill_list "$PID" $KIDS
        alive "$PID" && die "pid $PID still alive after KILL"
        echo "stopped sshd pid $PID${KIDS:+ (+ session processes: ${KIDS//$'\n'/ })}"
    else
        echo "sshd pid $PID not running"
    fi
    rm -f "$D/sshd.pid"
else
    echo "stop-sshd: no $D/sshd.pid (not started or already stopped)" >&2
fi

ORPH=$(orphans)
if [ -n "$ORPH" ]; then
    ORPH=$({
        echo "$ORPH"
        for o in $ORPH; do descendants "$o"; done
    } | sort -u)
    # shellcheck disable=SC2086
    kill_list $ORPH
    echo "stopped orphaned session processes on port $PORT: ${ORPH//$'\n'/ }"
fi

if [ "$KEEP" != "--keep" ] && [ -f "$D/sshd_config" ]; then
    rm -rf -- "$D"
fi
exit 0
