#!/usr/bin/env bash
# start-sshd.sh -- a throwaway OpenSSH server on 127.0.0.1 for the transfer tests and benchmark.
#
#   tests/infra/ssh/start-sshd.sh [STATE_DIR]        stop with: tests/infra/ssh/stop-sshd.sh STATE_DIR
#
# env:  SSHD_PORT     port, or "auto" (default): a free high port chosen by the kernel
#       SSHD_USER     login user (default "sshtest" as root, created when missing; the current
#                     user otherwise: an unprivileged sshd can only log in its own user)
#       SSHD_SFTP     sftp subsystem (default /usr/lib/openssh/sftp-server; "internal-sftp" works too)
#       SSHD_TIMEOUT  seconds to wait for the banner (default 10)
#       SSHD_NO_INSTALL=1  never run apt-get (fail instead when openssh-server is missing; go on
#                     without zstd)
#
# Key-only login with keys generated here (server host key + client key); nothing of the system's
# /etc/ssh is used. All state lives in STATE_DIR (default: a new /tmp/mqi-sshd.XXXXXX). Outside
# it, as root only: openssh-server and zstd (the remote side's stream compressor) are installed
# when missing (services kept from starting), the test user is created and unlocked, /run/sshd
# is created.
#
# On success prints shell-sourceable lines (also written to STATE_DIR/env):
#   SSHD_DIR SSHD_HOST SSHD_PORT SSHD_USER SSHD_KEY SSHD_KNOWN_HOSTS SSHD_SSH_CONFIG SSHD_PID
#   SSHD_LOG SSHD_REMOTE_DIR SSHD_STARTUP_S
# Everything else (progress, apt output, errors) goes to stderr. Restarting with the same
# STATE_DIR and SSHD_PORT keeps the keys, so clients' known_hosts stay valid.
set -euo pipefail

SSHD_BIN=${SSHD_BIN:-/usr/sbin/sshd} # absolute path: sshd re-executes itself
PORT=${SSHD_PORT:-auto}
SFTP=${SSHD_SFTP:-/usr/lib/openssh/sftp-server}
WAIT_S=${SSHD_TIMEOUT:-10}

die() {
    echo "start-sshd: $*" >&2
    exit 1
}
T0=$(date +%s.%N)

# shellcheck source=tests/infra/machine.sh
. "$(dirname "$(readlink -f "$0")")/../machine.sh"

install_packages() { # PACKAGE...
    local log=${TMPDIR:-/tmp}/mqi-sshd-apt.log
    echo "start-sshd: installing $* (apt-get output: $log)" >&2
    # Keep the package's postinst from starting a system sshd on 0.0.0.0:22 (invoke-rc.d and
    # deb-systemd-invoke both honour policy-rc.d); ours is removed again afterwards.
    local policy=/usr/sbin/policy-rc.d own_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 0755 "$policy" && own_policy=1
    fi
    local rc=0
    # waits (APT_LOCK_WAIT_S, 600 s) while another program holds the apt/dpkg lock
    APT_LOG_TAG=start-sshd apt_install "$log" "$@" || rc=$?
    [ "$own_policy" = 1 ] && rm -f "$policy"
    [ "$rc" = 0 ] || die "could not install $* (see above)"
}

missing=()
[ -x "$SSHD_BIN" ] || missing+=(openssh-server)
command -v zstd >/dev/null || missing+=(zstd)
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && [ "${SSHD_NO_INSTALL:-0}" != 1 ] && command -v apt-get >/dev/null; then
        install_packages "${missing[@]}"
    elif [ ! -x "$SSHD_BIN" ]; then
        die "$SSHD_BIN not found: install openssh-server (apt-get install openssh-server)"
    else
        echo "start-sshd: zstd not found: transfers to this server go uncompressed" >&2
    fi
fi
[ -x "$SSHD_BIN" ] || die "$SSHD_BIN still missing after installing openssh-server"
command -v ssh-keygen >/dev/null || die "ssh-keygen not found (apt-get install openssh-client)"
[ "$SFTP" = internal-sftp ] || [ -x "$SFTP" ] || die "sftp server $SFTP not found"

D=${1:-$(mktemp -d /tmp/mqi-sshd.XXXXXX)}
mkdir -p "$D"
D=$(cd "$D" && pwd -P)
if [ -e "$D/sshd.pid" ]; then
    old=$(cat "$D/sshd.pid")
    if [ -d "/proc/$old" ] && tr '\0' ' ' <"/proc/$old/cmdline" 2>/dev/null | grep -qF "$D/sshd_config"; then
        die "an sshd from $D is already running (pid $old)"
    fi
fi

if [ "$(id -u)" = 0 ]; then
    USER_NAME=${SSHD_USER:-sshtest}
    if ! getent passwd "$USER_NAME" >/dev/null; then
        useradd --create-home --shell /bin/bash "$USER_NAME"
        record_added "user $USER_NAME" # tests/infra/cleanup.sh removes it again
    fi
    # useradd leaves the password field "!" (locked); with UsePAM no, sshd then refuses every
    # method, public key included. "*" = no usable password, but not locked.
    case "$(getent shadow "$USER_NAME" | cut -d: -f2)" in
        '!' | '!!' | '!*') usermod -p '*' "$USER_NAME" ;;
    esac
    mkdir -p /run/sshd && chmod 0755 /run/sshd # privilege separation dir, normally made by systemd
    chmod 0755 "$D"                            # sshd reads authorized_keys as the user
else
    USER_NAME=$(id -un)
fi
USER_HOME=$(getent passwd "$USER_NAME" | cut -d: -f6)
[ -d "$USER_HOME" ] || die "home of $USER_NAME ($USER_HOME) does not exist"

if [ "$PORT" = auto ]; then
    PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
[[ "$PORT" =~ ^[0-9]+$ ]] || die "bad port '$PORT'"
if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
    die "127.0.0.1:$PORT is already in use"
fi

# keys: the server's host key and the tests' client key (kept across restarts)
[ -f "$D/ssh_host_ed25519_key" ] || ssh-keygen -q -t ed25519 -N '' -C mqi-sshd-host -f "$D/ssh_host_ed25519_key"
[ -f "$D/id_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -C mqi-sshd-client -f "$D/id_ed25519"
cp "$D/id_ed25519.pub" "$D/authorized_keys"
chmod 0644 "$D/authorized_keys" "$D/ssh_host_ed25519_key.pub" "$D/id_ed25519.pub"
chmod 0600 "$D/ssh_host_ed25519_key" "$D/id_ed25519"
# known_hosts for a non-22 port is keyed "[host]:port"
echo "[127.0.0.1]:$PORT $(cut -d' ' -f1,2 "$D/ssh_host_ed25519_key.pub")" >"$D/known_hosts"

# StrictModes no: the state dir usually sits below /tmp (world-writable), which StrictModes rejects.
# MaxSessions 10 is OpenSSH's default, as on a real login node (clients must not open more).
cat >"$D/sshd_config" <<CONF
# throwaway test sshd, written by start-sshd.sh; the system configuration is not included
Port $PORT
ListenAddress 127.0.0.1
HostKey $D/ssh_host_ed25519_key
PidFile $D/sshd.daemon.pid
AuthorizedKeysFile $D/authorized_keys
AllowUsers $USER_NAME
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin no
UsePAM no
StrictModes no
UseDNS no
PrintMotd no
PrintLastLog no
X11Forwarding no
AllowTcpForwarding no
AllowAgentForwarding no
PermitTTY no
MaxStartups 100:30:200
MaxSessions 10
MaxAuthTries 6
LoginGraceTime 30
LogLevel VERBOSE
Subsystem sftp $SFTP
CONF
"$SSHD_BIN" -t -f "$D/sshd_config" >&2 || die "sshd -t rejected $D/sshd_config"

# -D: stay in the foreground (we keep the pid), -E: log to a file; setsid: own session, so the
# caller's job control and Ctrl-C do not reach it.
: >"$D/sshd.log"
setsid "$SSHD_BIN" -D -f "$D/sshd_config" -E "$D/sshd.log" </dev/null >/dev/null 2>&1 &
PID=$!
echo "$PID" >"$D/sshd.pid" # our record; sshd removes its own PidFile on exit

# ready = accepts TCP and sends the "SSH-2.0-" banner
deadline=$(($(date +%s) + WAIT_S))
ready=0
while [ "$(date +%s)" -le "$deadline" ]; do
    if ! kill -0 "$PID" 2>/dev/null; then
        cat "$D/sshd.log" >&2
        die "sshd exited during startup"
    fi
    if banner=$(timeout 1 bash -c "exec 3<>/dev/tcp/127.0.0.1/$PORT && head -c 8 <&3" 2>/dev/null) &&
        [ "$banner" = "SSH-2.0-" ]; then
        ready=1
        break
    fi
    sleep 0.02
done
if [ "$ready" != 1 ]; then
    kill "$PID" 2>/dev/null || true
    cat "$D/sshd.log" >&2
    die "sshd not ready after ${WAIT_S}s"
fi

# a folder the test user owns, inside the state dir (removed with it)
REMOTE_DIR="$D/remote"
if [ "$(id -u)" = 0 ]; then
    install -d -o "$USER_NAME" -g "$(id -gn "$USER_NAME")" -m 0755 "$REMOTE_DIR"
else
    mkdir -p "$REMOTE_DIR"
fi

# for OpenSSH clients (ssh -F, scp -F): same key, same known_hosts
cat >"$D/ssh_config" <<CONF
Host sshd-test
    HostName 127.0.0.1
    Port $PORT
    User $USER_NAME
    IdentityFile $D/id_ed25519
    IdentitiesOnly yes
    UserKnownHostsFile $D/known_hosts
    GlobalKnownHostsFile /dev/null
    StrictHostKeyChecking yes
    BatchMode yes
    LogLevel ERROR
CONF

STARTUP=$(awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.3f", b - a }')
cat >"$D/env" <<ENV
SSHD_DIR=$D
SSHD_HOST=127.0.0.1
SSHD_PORT=$PORT
SSHD_USER=$USER_NAME
SSHD_KEY=$D/id_ed25519
SSHD_KNOWN_HOSTS=$D/known_hosts
SSHD_SSH_CONFIG=$D/ssh_config
SSHD_PID=$PID
SSHD_LOG=$D/sshd.log
SSHD_REMOTE_DIR=$REMOTE_DIR
SSHD_STARTUP_S=$STARTUP
ENV
cat "$D/env"
