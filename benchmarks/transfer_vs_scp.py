"""Transfer benchmark: mqi_communicator.transfer against OpenSSH scp, on loopback, same server.

    .venv/bin/python benchmarks/transfer_vs_scp.py [--repeats 3] [--download-mb 500] [--csv-files 100] [--csv-mb 90]

Starts the throwaway sshd of the tests (tests/infra/ssh/start-sshd.sh; openssh-server is installed
when missing), then measures, alternating the order each repeat:

- download of a raw dose file: a 3-D MC-like dose of a 10x10 cm proton field on MOQUI's 400x400
  1-mm grid, float64, zero where no proton deposited (the target's case), and of a file of
  random bytes (incompressible: the worst case for the zstd stream, not a dose),
- upload of a case's MOQUI CSV folder (plan + per-layer CSVs in beam folders),

with transfer.py (as the workflow calls it: connect, transfer, sha256 verified on both sides,
.part + rename; compression "auto" = zstd, as the server has it; "none" shown for reference)
and with ``scp`` using the same key, known_hosts and server (its default cipher;
``scp -c aes128-gcm@openssh.com``, the cipher transfer.py negotiates, is shown too).
Times include connecting. Prints per-run MB/s, medians and the ratio to scp against the
1.3x target. On loopback the client, sshd, sftp-server, zstd and the remote hash share this
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


def write_dose_volume(path: Path, size: int, seed: int = 3) -> float:
    """A 3-D float64 dose like MOQUI's: 400x400 planes of 1 mm, a 10x10 cm field of 19x19 spots
    whose width grows with depth, 5 % MC noise at the maximum (more where the dose is low), and
    exactly 0 where the expected dose is under 1e-5 of the maximum (no proton got there). Returns
    the fraction of zero voxels (MOQUI's real 1S070 plane in shared/reference-data: 0.84)."""
    rng = np.random.default_rng(seed)
    n = 400
    x = np.arange(n) - n / 2 + 0.5
    spots = np.arange(-45.0, 46.0, 5.0)
    plane_bytes = n * n * 8
    n_planes = -(-size // plane_bytes)
    zeros = written = 0
    with open(path, "wb") as f:
        for z in range(n_planes):
            sigma = 4.0 + 4.0 * z / n_planes
            profile = sum(np.exp(-0.5 * ((x - s) / sigma) ** 2) for s in spots)
            expected = np.outer(profile, profile)
            expected /= expected.max()
            noise = rng.standard_normal(expected.shape) * 0.05 / np.sqrt(np.maximum(expected, 1e-3))
            dose = np.clip(expected * (1 + noise), 0.0, None)
            dose[expected < 1e-5] = 0.0
            data = dose.astype("<f8").tobytes()[: size - written]
            zeros += int(np.count_nonzero(dose.ravel()[: len(data) // 8] == 0))
            f.write(data)
            written += len(data)
    return zeros / (size // 8)


def write_random(path: Path, size: int) -> None:
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
    parser.add_argument("--no-random", action="store_true", help="skip the random-bytes download")
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
        raws = {"dose": server.remote_dir / "dose.raw"}
        zero_fraction = write_dose_volume(raws["dose"], raw_size)
        if not args.no_random:
            raws["random"] = server.remote_dir / "random.raw"
            write_random(raws["random"], raw_size)
        for path in raws.values():
            if os.geteuid() == 0:
                shutil.chown(path, server.user, server.user)
        raw_sha = {kind: sha256(path) for kind, path in raws.items()}
        csv_src = work / "moqui_csv"
        write_csv_folder(csv_src, args.csv_files, args.csv_mb * 1_000_000)
        n_csv, csv_size = tree_bytes(csv_src)
        print(
            f"data: dose volume {raw_size / 1e6:.0f} MB ({zero_fraction:.0%} zero voxels"
            + (", and random bytes of the same size" if "random" in raws else "")
            + f"); CSV folder {n_csv} files, {csv_size / 1e6:.1f} MB (made in {time.perf_counter() - t0:.1f} s)"
        )
        print(f"server: OpenSSH on 127.0.0.1:{server.port}; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")

        dl_local = work / "dl" / "dose.raw"
        dl_local.parent.mkdir()
        up_remote = server.remote_dir / "moqui_csv"

        def download_ours(kind: str, compression: str = "auto", known_sha: bool = False) -> Callable[[], None]:
            def go() -> None:
                # known_sha: the sha256 known beforehand, as the workflow has it from the remote job
                with transfer.connect(**conn_args, compression=compression) as conn:
                    expected = raw_sha[kind] if known_sha else None
                    digest = transfer.download_file(conn, str(raws[kind]), dl_local, expected_sha256=expected)
                assert digest == raw_sha[kind]

            return go

        def download_scp(kind: str, cipher: list[str]) -> Callable[[], None]:
            def go() -> None:
                subprocess.run(["scp", "-q", *ssh_cfg, *cipher, f"sshd-test:{raws[kind]}", str(dl_local)], check=True)

            return go

        def upload_ours(compression: str = "auto") -> Callable[[], None]:
            def go() -> None:
                with transfer.connect(**conn_args, compression=compression) as conn:
                    report = transfer.upload_tree(conn, csv_src, str(up_remote))
                assert len(report.uploaded) == n_csv

            return go

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

        def check_download() -> None:
            assert dl_local.stat().st_size == raw_size

        def check_upload() -> None:
            assert tree_bytes(up_remote) == (n_csv, csv_size)

        gcm = ["-c", "aes128-gcm@openssh.com"]
        cases: dict[str, tuple[int, Callable[[], None], Callable[[], None], dict[str, Callable[[], None]]]] = {}
        for kind in raws:
            runners = {
                "transfer.py": download_ours(kind),
                "transfer.py known sha": download_ours(kind, known_sha=True),
                "transfer.py no zstd": download_ours(kind, compression="none"),
                "scp": download_scp(kind, []),
            }
            if not args.no_scp_gcm:
                runners["scp -c aes128-gcm"] = download_scp(kind, gcm)
            cases[f"download {kind}"] = (raw_size, clean_download, check_download, runners)
        runners = {"transfer.py": upload_ours(), "transfer.py no zstd": upload_ours("none"), "scp": upload_scp([])}
        if not args.no_scp_gcm:
            runners["scp -c aes128-gcm"] = upload_scp(gcm)
        cases["upload CSVs"] = (csv_size, clean_upload, check_upload, runners)

        rates: dict[tuple[str, str], list[float]] = {}
        for repeat in range(args.repeats):
            for op, (size, clean, check, runners) in cases.items():
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
                    check()
                clean()
            print(f"repeat {repeat + 1}/{args.repeats} done (load {os.getloadavg()[0]:.2f})")

        print()
        print(f"{'':16} {'tool':22} {'runs (MB/s)':22} {'median':>7} {'vs scp':>7}")
        verdicts = []
        for op, (_, _, _, runners) in cases.items():
            scp_median = statistics.median(rates[(op, "scp")])
            for tool in runners:
                runs = rates[(op, tool)]
                median = statistics.median(runs)
                runs_text = ", ".join(f"{r:.0f}" for r in runs)
                print(f"{op:16} {tool:22} {runs_text:22} {median:7.0f} {median / scp_median:6.2f}x")
            for tool in ("transfer.py", "transfer.py known sha"):
                ratio = statistics.median(rates[(op, tool)]) / scp_median if (op, tool) in rates else None
                if ratio is not None:
                    verdicts.append(f"{op} ({tool}): {ratio:.2f}x {'MET' if ratio >= TARGET_RATIO else 'MISSED'}")
        print(f"\ntarget >= {TARGET_RATIO}x scp (medians of {args.repeats}):\n  " + "\n  ".join(verdicts))
        print(
            "transfer.py times include connect, sha256 on both sides (the remote one computed during the run,\n"
            "except 'known sha': computed beforehand, as by the workflow's remote job) and the atomic rename;\n"
            "scp does not verify. The random-bytes file is the worst case for zstd, not a dose."
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
