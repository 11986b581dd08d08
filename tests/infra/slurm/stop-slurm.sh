#!/usr/bin/env bash
# stop-slurm.sh - stop what start-slurm.sh started: the pids in $SLURM_CI_ROOT/run, never
# processes found by name. Cancels the jobs still queued or running first. Safe to rerun.
#   SLURM_CI_ROOT   same value as for start-slurm.sh (/tmp/mqi-slurm)
#   --purge         also delete $SLURM_CI_ROOT (munge key, logs, state)
# It also removes the /etc/slurm/*.conf files start-slurm.sh wrote (it renders them on every start):
# with a slurm.conf whose controller is down, every `snakemake` start, even a local run, takes
# ~10 s longer, because the slurm executor plugin runs `scontrol show config` when it is imported.
set -uo pipefail

ROOT=${SLURM_CI_ROOT:-/tmp/mqi-slurm}
CONF_DIR=/etc/slurm
MARKER="# managed-by: mqi_communicator tests/infra/slurm/start-slurm.sh"
PURGE=0
[ "${1:-}" = --purge ] && PURGE=1
export SLURM_CONF=$CONF_DIR/slurm.conf

log() { printf '[stop-slurm] %s\n' "$*"; }

remove_configs() {
    local f
    for f in slurm.conf gres.conf cgroup.conf; do
        if [ -f "$CONF_DIR/$f" ] && [[ "$(head -n 1 "$CONF_DIR/$f")" == "$MARKER"* ]]; then
            rm -f "$CONF_DIR/$f"
            log "removed $CONF_DIR/$f"
        fi
    done
}

if [ ! -d "$ROOT" ]; then
    log "nothing to stop ($ROOT does not exist)"
    remove_configs
    exit 0
fi
if [ "${SLURM_CI_LOCKED:-0}" != 1 ]; then # start-slurm.sh already holds the lock when it calls us
    exec 9>"$ROOT/.start.lock"
    flock -w 120 9 || log "warning: $ROOT/.start.lock still held after 120 s; stopping anyway"
fi

# shellcheck source=tests/infra/slurm/pid-of.sh
. "$(dirname "$(readlink -f "$0")")/pid-of.sh"

# alive PID: exists and is not a zombie (kill -0 succeeds on zombies, and without an init
# system orphans may be reaped late).
alive() { [ -r "/proc/$1/stat" ] && [ "$(sed 's/.*) //' "/proc/$1/stat" | cut -d' ' -f1)" != Z ]; }

stop_one() {
    local name=$1 pid
    if ! pid=$(pid_of "$name"); then
        [ -e "$ROOT/run/$name.pid" ] && log "$name: not running (stale pid file removed)"
        rm -f "$ROOT/run/$name.pid"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 1 100); do
        alive "$pid" || break
        sleep 0.1
    done
    if alive "$pid"; then
        log "$name (pid $pid) ignored SIGTERM for 10 s: SIGKILL"
        kill -KILL "$pid" 2>/dev/null
        sleep 0.2
    fi
    rm -f "$ROOT/run/$name.pid"
    log "$name (pid $pid) stopped"
}

# 1. Cancel the jobs our controller still runs, so no slurmstepd or job process lingers.
if pid_of slurmctld >/dev/null && command -v squeue >/dev/null; then
    jobs=$(timeout 10 squeue -h -o %i -t PENDING,RUNNING,CONFIGURING,COMPLETING,SUSPENDED 2>/dev/null | tr '\n' ' ')
    if [ -n "${jobs// /}" ]; then
        log "cancelling jobs: $jobs"
        # shellcheck disable=SC2086
        timeout 10 scancel $jobs 2>/dev/null || true
        for _ in $(seq 1 50); do
            [ -z "$(timeout 5 squeue -h -o %i -t RUNNING,COMPLETING 2>/dev/null)" ] && break
            sleep 0.2
        done
    fi
fi

# 2. The daemons, in reverse start order; then the config files.
for d in slurmd slurmctld munged; do stop_one "$d"; done
remove_configs

if [ "$PURGE" = 1 ]; then
    case "$ROOT" in
    / | /tmp | /etc | /usr | /var | /root | "") log "refusing to delete SLURM_CI_ROOT=$ROOT" ;;
    *)
        rm -rf "$ROOT"
        log "removed $ROOT"
        ;;
    esac
fi
exit 0
