"""Transfer benchmark: mqi_communicator.transfer against OpenSSH scp, on loopback, same server.

    .venv/bin/python benchmarks/transfer_vs_scp.py [--repeats 3] [--download-mb 500] [--csv-files 100] [--csv-mb 90]

Starts the throwaway sshd of the tests (tests/infra/ssh/start-sshd.sh; openssh-server is installed
when missing), then measures, alternating the order each repeat:

- download of one raw file (random data: incompressible, like a worst-case dose volume),
- upload of a case's MOQUI CSV folder (plan + per-layer CSVs in beam folders),

with transfer.py (as the workflow calls it: connect, transfer, sha256 verified on both sides,
.part + rename) and with ``scp`` using the same key, known_hosts and server (its default
cipher; ``scp -c aes128-gcm@openssh.com``, the cipher transfer.py negotiates, is shown too).
Times include connecting. Prints per-run MB/s, medians and the ratio to scp against the
1.3x target. On loopback the client, sshd, sftp-server and the remote hash share this
machine's cores. All data lives under /tmp and is removed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the throwaway sshd helper lives in tests/

from mqi_communicator import transfer  # noqa: E402
from tests.infra.sshd_fixture import SshServer  # noqa: E402

TARGET_RATIO = 1.3


def write_raw(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = min(left, 8 << 20)
            f.write(os.urandom(chunk))
            left -= chunk


def write_csv_folder(root: Path, n_files: int, total_bytes: int, seed: int = 7) -> None:
    """A P2-like output folder: plan/RP*.dcm and log/<beam>/<NN>_<E>MeV.csv with CRLF rows of
    ``time_ms,x_mm,y_mm,count`` (float32 shortest repr; a spot's position repeats over its ~130
    samples, as in the delivery logs)."""
    rng = np.random.default_rng(seed)
    (root / "plan").mkdir(parents=True)
    plan_size = 400_000
    (root / "plan" / "RP.bench.dcm").write_bytes(b"\0" * 128 + b"DICM" + rng.bytes(plan_size - 132))
    beams = ["1G180_TX", "2G90", "3G270"]
    per_file = (total_bytes - plan_size) // (n_files - 1)
    times = [str(np.float32(i * 0.0600745)) for i in range(per_file // 20)]
    for i in range(n_files - 1):
        beam, layer = beams[i % len(beams)], i // len(beams) + 1
        folder = root / "log" / beam
        folder.mkdir(parents=True, exist_ok=True)
        rows: list[str] = []
        size = 0
        while size < per_file:
            x, y = (str(v) for v in rng.uniform(-100, 100, 2).astype(np.float32))
            for count in rng.integers(0, 4, 130).tolist():
                row = f"{times[len(rows)]},{x},{y},{count}\r\n"
                rows.append(row)
                size += len(row)
        (folder / f"{layer:02d}_{180 - 1.5 * layer:.2f}MeV.csv").write_text("".join(rows)[:per_file], newline="")


def tree_bytes(root: Path) -> tuple[int, int]:
    files = [p for p in root.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--download-mb", type=int, default=500)
    parser.add_argument("--csv-files", type=int, default=100)
    parser.add_argument("--csv-mb", type=int, default=90)
    parser.add_argument("--no-scp-gcm", action="store_true", help="skip the scp -c aes128-gcm reference")
    args = parser.parse_args()
    if not shutil.which("scp"):
        print("scp not found (apt-get install openssh-client)", file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp(prefix="mqi-xfer-bench-", dir="/tmp"))
    server = SshServer(Path(tempfile.mkdtemp(prefix="mqi-sshd-bench-", dir="/tmp")))
    try:
        server.start()
        conn_args = server.connect_args()
        ssh_cfg = ["-F", str(server.ssh_config)]

        t0 = time.perf_counter()
        raw_size = args.download_mb * 1_000_000
        raw_remote = server.remote_dir / "dose.raw"
        write_raw(raw_remote, raw_size)
        if os.geteuid() == 0:
            shutil.chown(raw_remote, server.user, server.user)
        raw_sha = sha256(raw_remote)
        csv_src = work / "moqui_csv"
        write_csv_folder(csv_src, args.csv_files, args.csv_mb * 1_000_000)
        n_csv, csv_size = tree_bytes(csv_src)
        print(
            f"data: raw file {raw_size / 1e6:.0f} MB; CSV folder {n_csv} files, {csv_size / 1e6:.1f} MB "
            f"(made in {time.perf_counter() - t0:.1f} s)"
        )
        print(f"server: OpenSSH on 127.0.0.1:{server.port}; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")

        dl_local = work / "dl" / "dose.raw"
        dl_local.parent.mkdir()
        up_remote = server.remote_dir / "moqui_csv"

        def download_ours() -> None:
            with transfer.connect(**conn_args) as conn:
                digest = transfer.download_file(conn, str(raw_remote), dl_local)
            assert digest == raw_sha

        def download_ours_expected() -> None:
            # the sha256 known beforehand (e.g. written by the remote job): no second remote read
            with transfer.connect(**conn_args) as conn:
                digest = transfer.download_file(conn, str(raw_remote), dl_local, expected_sha256=raw_sha)
            assert digest == raw_sha

        def download_scp(cipher: list[str]) -> Callable[[], None]:
            def go() -> None:
                subprocess.run(["scp", "-q", *ssh_cfg, *cipher, f"sshd-test:{raw_remote}", str(dl_local)], check=True)

            return go

        def upload_ours() -> None:
            with transfer.connect(**conn_args) as conn:
                report = transfer.upload_tree(conn, csv_src, str(up_remote))
            assert len(report.uploaded) == n_csv

        def upload_scp(cipher: list[str]) -> Callable[[], None]:
            def go() -> None:
                subprocess.run(
                    ["scp", "-q", "-r", *ssh_cfg, *cipher, str(csv_src), f"sshd-test:{up_remote}"], check=True
                )

            return go

        def clean_download() -> None:
            dl_local.unlink(missing_ok=True)
            Path(str(dl_local) + transfer.PART_SUFFIX).unlink(missing_ok=True)

        def clean_upload() -> None:
            shutil.rmtree(up_remote, ignore_errors=True)

        gcm = ["-c", "aes128-gcm@openssh.com"]
        extra = [] if args.no_scp_gcm else ["scp -c aes128-gcm"]
        cases = {
            "download": (
                raw_size,
                clean_download,
                dict(
                    zip(
                        ["transfer.py", "scp", *extra, "transfer.py expected"],
                        [download_ours, download_scp([]), download_scp(gcm), download_ours_expected],
                        strict=False,
                    )
                ),
            ),
            "upload": (
                csv_size,
                clean_upload,
                dict(zip(["transfer.py", "scp", *extra], [upload_ours, upload_scp([]), upload_scp(gcm)], strict=False)),
            ),
        }
        rates: dict[tuple[str, str], list[float]] = {}
        for repeat in range(args.repeats):
            for op, (size, clean, runners) in cases.items():
                order = list(runners.items())
                if repeat % 2:
                    order.reverse()
                for tool, runner in order:
                    clean()
                    subprocess.run(["sync"], check=False)  # no writeback of the previous run during this one
                    t0 = time.perf_counter()
                    runner()
                    seconds = time.perf_counter() - t0
                    rates.setdefault((op, tool), []).append(size / 1e6 / seconds)
                    if op == "download":
                        assert dl_local.stat().st_size == raw_size
                    else:
                        assert tree_bytes(up_remote) == (n_csv, csv_size)
                clean()
            print(f"repeat {repeat + 1}/{args.repeats} done (load {os.getloadavg()[0]:.2f})")

        print()
        print(f"{'':10} {'tool':20} {'runs (MB/s)':28} {'median':>8} {'vs scp':>7}")
        verdicts = []
        for op, (_, _, runners) in cases.items():
            scp_median = statistics.median(rates[(op, "scp")])
            for tool in runners:
                runs = rates[(op, tool)]
                median = statistics.median(runs)
                runs_text = ", ".join(f"{r:.0f}" for r in runs)
                print(f"{op:10} {tool:20} {runs_text:28} {median:8.0f} {median / scp_median:6.2f}x")
            ratio = statistics.median(rates[(op, "transfer.py")]) / scp_median
            verdicts.append(f"{op}: {ratio:.2f}x scp -> {'MET' if ratio >= TARGET_RATIO else 'MISSED'}")
        print(f"\ntarget >= {TARGET_RATIO}x scp (medians of {args.repeats}): " + "; ".join(verdicts))
        print(
            "transfer.py times include connect, sha256 on both sides (the remote one computed during the run,\n"
            "except 'transfer.py expected': sha256 known beforehand) and the atomic rename; scp does not verify."
        )
    finally:
        try:
            server.stop(keep=False)
        finally:
            shutil.rmtree(server.state_dir, ignore_errors=True)
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
