# shellcheck shell=bash
# Sourced by start-slurm.sh and stop-slurm.sh (which set ROOT).
# pid_of NAME: the live pid recorded in $ROOT/run/NAME.pid whose executable is NAME (Debian's
# slurmd is slurmd-wlm), guarding against a recycled pid; returns 1 otherwise.
pid_of() {
    local f="$ROOT/run/$1.pid" pid exe
    [ -r "$f" ] || return 1
    pid=$(tr -dc 0-9 <"$f")
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
    exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || return 1
    exe=$(basename "${exe% (deleted)}")
    case "$exe" in "$1" | "$1-wlm") echo "$pid" ;; *) return 1 ;; esac
}
