"""Hold the apt/dpkg locks the way apt-get does (fcntl write locks) for a while.

    python3 tests/infra/hold_apt_lock.py SECONDS [LOCKFILE...]

Default lock files: /var/lib/dpkg/lock-frontend and /var/lib/dpkg/lock (what `apt-get install`
holds while it runs; needs root). Prints "held" once the locks are taken. For showing that
tests/infra/apt-lock.sh waits instead of failing (`flock FILE sleep N` is no stand-in: flock(2)
locks are invisible to apt's fcntl locks and apt would not wait for them).
"""

from __future__ import annotations

import fcntl
import sys
import time

DEFAULT = ["/var/lib/dpkg/lock-frontend", "/var/lib/dpkg/lock"]


def main() -> None:
    seconds = float(sys.argv[1])
    files = [open(path, "a") for path in (sys.argv[2:] or DEFAULT)]  # noqa: SIM115 (held open)
    for f in files:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    print("held", flush=True)
    time.sleep(seconds)


if __name__ == "__main__":
    main()
