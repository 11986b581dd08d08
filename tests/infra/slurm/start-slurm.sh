#!/usr/bin/env bash
# start-slurm.sh - a private single-node SLURM (Debian 12: SLURM 22.05) on 127.0.0.1 for tests,
# as root, without systemd: munged + slurmctld + slurmd, partitions "cpu" (default) and "gpu",
# GRES gpu:N backed by dummy device files (symlinks to /dev/null), so `--gpus=1` / `--gres=gpu:1`
# jobs run on a machine without GPUs and see CUDA_VISIBLE_DEVICES.
# Adapted from the tested recipe in the project's shared reference (shared/ref/slurm).
#
# Usage (root):  tests/infra/slurm/start-slurm.sh   ...   tests/infra/slurm/stop-slurm.sh
# Idempotent: if the cluster it started is up with the same config, it does nothing.
# Prints "SLURM ready in N s" and exits 0 once the node is idle and a GPU smoke job ran;
# exits 1 with the reason (and the daemons' log tails) otherwise, leaving nothing running.
#
# Environment (all optional):
#   SLURM_CI_ROOT      state, logs, pid files, munge key, fake devices   (/tmp/mqi-slurm)
#   SLURM_CI_CPUS      CPUs the node advertises (may exceed nproc)       (32)
#   SLURM_CI_GPUS      fake GPUs (enough for two test workers at once)   (8)
#   SLURM_CI_GPU_TYPE  GRES type (e.g. a100, for gpu_model=...); empty = untyped ()
#   SLURM_CI_MEM_MB    RealMemory of the node                            (MemTotal - 1024)
#   SLURM_CI_PORT_BASE slurmctld=BASE, slurmd=BASE+1                     (6817)
#   SLURM_CI_TIMEOUT   seconds to wait for each daemon                   (60)
#   SLURM_CI_INSTALL   auto: apt-get install missing packages; 0: never  (auto)
#   SLURM_CI_SMOKE     1: run `srun -p gpu --gpus=1` once at the end     (1)
#   SLURM_CI_FORCE     1: back up and replace a /etc/slurm/slurm.conf this script did not write (0)
#
# Pitfalls this handles (each cost hours to find):
# - The config MUST be in /etc/slurm (the compiled-in default): snakemake's slurm executor strips
#   every SLURM_* variable, SLURM_CONF included, before its nested `srun`.
# - No slurmdbd here: `sacct` fails, and the slurm executor (which prefers sacct whenever the
#   binary exists) then silently drops its jobs and waits forever. Profiles for this cluster must
#   set `slurm-status-command: squeue`, which is reliable while MinJobAge (300 s) >= 3 x
#   `slurm-init-seconds-before-status-checks`.
# - SLURM 22.05 slurmd always initialises a cgroup plugin: cgroup.conf with IgnoreSystemd.
# - munged refuses a key dir writable by group/others and a socket dir without o+x.
set -Eeuo pipefail

HERE=$(dirname "$(readlink -f "$0")")
ROOT=${SLURM_CI_ROOT:-/tmp/mqi-slurm}
CONF_DIR=/etc/slurm
CPUS=${SLURM_CI_CPUS:-32}
GPUS=${SLURM_CI_GPUS:-8}
GPU_TYPE=${SLURM_CI_GPU_TYPE:-}
PORT_BASE=${SLURM_CI_PORT_BASE:-6817}
TIMEOUT=${SLURM_CI_TIMEOUT:-60}
INSTALL=${SLURM_CI_INSTALL:-auto}
SMOKE=${SLURM_CI_SMOKE:-1}
FORCE=${SLURM_CI_FORCE:-0}
MARKER="# managed-by: mqi_communicator tests/infra/slurm/start-slurm.sh"
# Configs written by the shared reference recipe are throwaway test configs too.
REPLACEABLE_MARKERS=("$MARKER" "# managed-by: start-slurm.sh")
NODE=localhost
DAEMONS=(munged slurmctld slurmd)

export SLURM_CONF=$CONF_DIR/slurm.conf # the default anyway; overrides a stray value from the caller
T0=$(date +%s%N)
STARTED=()

elapsed() {
    local ms=$((($(date +%s%N) - T0) / 1000000))
    printf '%d.%03d' $((ms / 1000)) $((ms % 1000))
}
log() { printf '[start-slurm +%ss] %s\n' "$(elapsed)" "$*"; }
die() {
    trap - ERR
    set +e
    printf '[start-slurm] ERROR: %s\n' "$*" >&2
    local d
    for d in "${STARTED[@]}"; do
        [ -s "$ROOT/log/$d.log" ] || continue
        printf -- '----- last lines of %s -----\n' "$ROOT/log/$d.log" >&2
        tail -n 15 "$ROOT/log/$d.log" >&2
    done
    if ((${#STARTED[@]})); then
        printf '[start-slurm] stopping what this run started: %s\n' "${STARTED[*]}" >&2
        SLURM_CI_ROOT=$ROOT SLURM_CI_LOCKED=1 bash "$HERE/stop-slurm.sh" >&2
    fi
    exit 1
}
trap 'die "unexpected failure at line $LINENO: $BASH_COMMAND"' ERR

# shellcheck source=tests/infra/slurm/pid-of.sh
. "$(dirname "$(readlink -f "$0")")/pid-of.sh"
# shellcheck source=tests/infra/machine.sh
. "$HERE/../machine.sh"

# wait_for WHAT DAEMON CMD...: rerun CMD every 0.2 s until it succeeds; fail after TIMEOUT or
# as soon as DAEMON (if not "-") has died.
wait_for() {
    local what=$1 daemon=$2
    shift 2
    local deadline=$(($(date +%s) + TIMEOUT))
    until "$@" >/dev/null 2>&1; do
        if [ "$daemon" != - ] && ! pid_of "$daemon" >/dev/null && [ -e "$ROOT/run/$daemon.pid" ]; then
            die "$daemon exited during start-up (see $ROOT/log/$daemon.log)"
        fi
        [ "$(date +%s)" -lt "$deadline" ] || die "timed out after ${TIMEOUT}s waiting for $what"
        sleep 0.2
    done
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

is_replaceable() {
    local first m
    [ -f "$1" ] || return 0
    first=$(head -n 1 "$1")
    for m in "${REPLACEABLE_MARKERS[@]}"; do [[ "$first" == "$m"* ]] && return 0; done
    return 1
}

# ---------------------------------------------------------------------------- checks ----
[ "$(id -u)" = 0 ] || die "must run as root: slurmctld/slurmd run as root and the config goes to $CONF_DIR"
[[ "$CPUS" =~ ^[1-9][0-9]*$ ]] || die "SLURM_CI_CPUS must be a positive integer, got '$CPUS'"
[[ "$GPUS" =~ ^[1-9][0-9]*$ ]] || die "SLURM_CI_GPUS must be a positive integer, got '$GPUS'"
[[ -z "$GPU_TYPE" || "$GPU_TYPE" =~ ^[A-Za-z0-9_.]+$ ]] || die "SLURM_CI_GPU_TYPE must match [A-Za-z0-9_.]+"
[[ "$PORT_BASE" =~ ^[0-9]+$ ]] || die "SLURM_CI_PORT_BASE must be a port number"

mkdir -p "$ROOT"
chmod 755 "$ROOT" # munged: every directory above its socket must be o+x
# Serialise concurrent starts (two test sessions at once); the nested stop skips the lock.
exec 9>"$ROOT/.start.lock"
# (long enough for another start that waits for the apt lock and installs the packages)
flock -w $((TIMEOUT + ${APT_LOCK_WAIT_S:-600} + 300)) 9 || die "another start-slurm.sh/stop-slurm.sh holds $ROOT/.start.lock"
export SLURM_CI_LOCKED=1

bins=(munged munge unmunge slurmctld slurmd sinfo sbatch srun squeue scontrol scancel)
pkgs=(munge slurmctld slurmd slurm-client)
missing=()
for b in "${bins[@]}"; do command -v "$b" >/dev/null 2>&1 || missing+=("$b"); done
if ((${#missing[@]})); then
    [ "$INSTALL" = 0 ] && die "missing commands: ${missing[*]} (apt-get install ${pkgs[*]}; SLURM_CI_INSTALL=0 forbids installing)"
    command -v apt-get >/dev/null || die "missing commands: ${missing[*]} and no apt-get to install ${pkgs[*]}"
    log "installing ${pkgs[*]} (missing: ${missing[*]}); apt-get output: $ROOT/apt.log"
    # The packages start no service: there is no init system here, or policy-rc.d forbids it.
    # apt_install waits (APT_LOCK_WAIT_S, 600 s) while another program holds the apt/dpkg lock.
    APT_LOG_TAG=start-slurm apt_install "$ROOT/apt.log" "${pkgs[@]}" ||
        die "could not install ${pkgs[*]} (see above; full log: $ROOT/apt.log)"
    for b in "${bins[@]}"; do command -v "$b" >/dev/null 2>&1 || die "$b still missing after installing ${pkgs[*]}"; done
    log "packages installed"
fi

mkdir -p "$ROOT"/{run,log,dev,munge} "$CONF_DIR"
chmod 755 "$ROOT/run"
chmod 700 "$ROOT/munge" # munged: the key dir must not be group/other writable

# ---------------------------------------------------------------------------- config ----
MEM_MB=${SLURM_CI_MEM_MB:-$(awk '/MemTotal/ {m = int($2 / 1024) - 1024; print (m > 1024 ? m : 1024)}' /proc/meminfo)}
GPU_FILES="$ROOT/dev/nvidia[0-$((GPUS - 1))]"
[ "$GPUS" = 1 ] && GPU_FILES="$ROOT/dev/nvidia0"
NODE_GRES="gpu:$GPUS"
GRES_TYPE=""
if [ -n "$GPU_TYPE" ]; then
    NODE_GRES="gpu:$GPU_TYPE:$GPUS"
    GRES_TYPE=" Type=$GPU_TYPE"
fi

render() { # render TEMPLATE: substitute @NAME@ placeholders
    sed -e "s|@MARKER@|$MARKER|g" -e "s|@ROOT@|$ROOT|g" \
        -e "s|@CTLD_PORT@|$PORT_BASE|g" -e "s|@SLURMD_PORT@|$((PORT_BASE + 1))|g" \
        -e "s|@CPUS@|$CPUS|g" -e "s|@MEM_MB@|$MEM_MB|g" -e "s|@NODE_GRES@|$NODE_GRES|g" \
        -e "s|@GRES_TYPE@|$GRES_TYPE|g" -e "s|@GPU_FILES@|$GPU_FILES|g" "$HERE/templates/$1"
}

CONFS=(slurm.conf gres.conf cgroup.conf)
# A real SLURM's config is never touched unless SLURM_CI_FORCE=1 (then it is backed up).
for c in "${CONFS[@]}"; do
    is_replaceable "$CONF_DIR/$c" && continue
    [ "$FORCE" = 1 ] || die "$CONF_DIR/$c was not written by a test script (first line: '$(head -n 1 "$CONF_DIR/$c")'): refusing to replace a real SLURM config. Set SLURM_CI_FORCE=1 to back it up and replace it."
    cp -p "$CONF_DIR/$c" "$CONF_DIR/$c.orig-$(date +%Y%m%d%H%M%S)"
    log "backed up the foreign $CONF_DIR/$c"
done
changed=0
for c in "${CONFS[@]}"; do
    [ -f "$CONF_DIR/$c" ] && [ "$(cat "$CONF_DIR/$c")" = "$(render "$c.in")" ] || changed=1
done

# ---------------------------------------------------------------- already running? ----
running=0
for d in "${DAEMONS[@]}"; do pid_of "$d" >/dev/null && running=$((running + 1)); done
if [ "$running" = "${#DAEMONS[@]}" ] && [ "$changed" = 0 ] &&
    sinfo -h -N -n "$NODE" -o %T 2>/dev/null | grep -Eq '^(idle|mixed|allocated)$'; then
    log "already running with unchanged config; nothing to do"
    exit 0
fi
if [ "$running" -gt 0 ] || compgen -G "$ROOT/run/*.pid" >/dev/null; then
    log "partial or stale cluster, or changed config: stopping what this script started before"
    SLURM_CI_ROOT=$ROOT bash "$HERE/stop-slurm.sh" # (also removes the config files)
fi
for p in "$PORT_BASE" $((PORT_BASE + 1)); do
    port_in_use "$p" && die "127.0.0.1:$p is in use by a process this script did not start (another SLURM?); set SLURM_CI_PORT_BASE"
done

for c in "${CONFS[@]}"; do
    render "$c.in" >"$CONF_DIR/$c.tmp.$$"
    chmod 644 "$CONF_DIR/$c.tmp.$$"
    mv -f "$CONF_DIR/$c.tmp.$$" "$CONF_DIR/$c"
done
for i in $(seq 0 $((GPUS - 1))); do ln -sfn /dev/null "$ROOT/dev/nvidia$i"; done

# Fresh controller and node state on every start: no stale jobs, no drained node.
rm -rf "$ROOT/state"
mkdir -p "$ROOT/state/slurmctld" "$ROOT/state/slurmd"

# ----------------------------------------------------------------------------- munge ----
if [ ! -s "$ROOT/munge/munge.key" ]; then
    mungekey --create --keyfile="$ROOT/munge/munge.key" 2>/dev/null ||
        dd if=/dev/urandom of="$ROOT/munge/munge.key" bs=1024 count=1 status=none
fi
chmod 400 "$ROOT/munge/munge.key"
munged --socket="$ROOT/run/munge.socket" --key-file="$ROOT/munge/munge.key" \
    --pid-file="$ROOT/run/munged.pid" --log-file="$ROOT/log/munged.log" \
    --seed-file="$ROOT/munge/munged.seed" 9>&- || die "munged failed to start (see $ROOT/log/munged.log)"
STARTED+=(munged)
wait_for munged munged bash -c "munge -S '$ROOT/run/munge.socket' -n | unmunge -S '$ROOT/run/munge.socket'"
log "munged up (pid $(pid_of munged))"

# ------------------------------------------------------------------ slurmctld/slurmd ----
# (each daemon is started with fd 9 closed: it must not inherit and keep the start lock)
slurmctld 9>&- || die "slurmctld failed to start (see $ROOT/log/slurmctld.log)"
STARTED+=(slurmctld)
wait_for "slurmctld (scontrol ping)" slurmctld bash -c "scontrol ping | grep -q 'is UP'"
log "slurmctld up (pid $(pid_of slurmctld))"

slurmd -N "$NODE" 9>&- || die "slurmd failed to start (see $ROOT/log/slurmd.log)"
STARTED+=(slurmd)
wait_for "slurmd pid file" slurmd pid_of slurmd

deadline=$(($(date +%s) + TIMEOUT))
resumed=0
while :; do
    state=$(sinfo -h -N -n "$NODE" -o %T 2>/dev/null | head -n 1 || true)
    [ "$state" = idle ] && break
    case "$state" in
    down* | drain* | fail*)
        if [ "$resumed" = 0 ]; then
            log "node is '$state' ($(sinfo -h -R -o %E | head -n 1)); resuming it once"
            scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true
            resumed=1
        fi
        ;;
    esac
    [ "$(date +%s)" -lt "$deadline" ] ||
        die "node $NODE not idle after ${TIMEOUT}s (state '$state', reason '$(sinfo -h -R -o %E | head -n 1)')"
    sleep 0.2
done
log "node $NODE idle: $(sinfo -h -N -n "$NODE" -o 'CPUs=%c Mem=%mMB Gres=%G' | head -n 1)"

if [ "$SMOKE" = 1 ]; then
    out=$(cd / && timeout "$TIMEOUT" srun -p gpu --gpus=1 -N1 -n1 -t 1 -J mqi-smoke printenv CUDA_VISIBLE_DEVICES 2>&1) ||
        die "smoke job 'srun -p gpu --gpus=1' failed: $out"
    [[ "$out" =~ ^[0-9]+$ ]] || die "smoke job: expected a GPU index in CUDA_VISIBLE_DEVICES, got '$out'"
    log "smoke job ok: srun -p gpu --gpus=1 -> CUDA_VISIBLE_DEVICES=$out"
fi

trap - ERR
sinfo
log "SLURM ready in $(elapsed)s (root=$ROOT, config=$CONF_DIR, no accounting: use slurm-status-command squeue)"
