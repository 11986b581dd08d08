"""Transfer benchmark: the remote transfer CLI against OpenSSH scp, whole commands, idle and loaded.

    .venv/bin/python benchmarks/transfer_vs_scp.py [--repeats 5] [--dose-mb 500] [--case-mb 90 500]

Starts the throwaway sshd of the tests (tests/infra/ssh/start-sshd.sh; openssh-server is installed
when missing) and times, as separate processes, exactly what the pipeline runs against what a
person would run with OpenSSH:

- download of a raw dose volume (500 MB: a 3-D MC-like dose of a 10x10 cm proton field on MOQUI's
  400x400 1-mm grid, float64, zero where no proton deposited):
  ``python -m mqi_communicator.remote.transfer download REMOTE LOCAL --expected-sha256 SHA``
  (stage-out: the sha256 comes from the job) against ``scp host:REMOTE LOCAL``;
- upload of a case's MOQUI CSV folder (110 files: plan + per-layer CSVs in beam folders + P2's
  summary; ~90 MB and ~500 MB):
  ``python -m mqi_communicator.remote.transfer upload DIR REMOTE --known-digests DIR/p2_summary.json``
  (stage-in: P2 hashes each file as it writes it and records the digest with the file's stat key
  in its summary; the upload reports those digests instead of hashing the files again, and checks
  that each file is still the one recorded) against ``scp -r DIR host:REMOTE``. The CPU time of
  P2's hashing is printed beside the results: it is not part of the timed commands.

Each time includes Python's start-up and imports (of the byte-compiled package), connecting, the
transfer and our verification (on the server zstd's frame checksums of the bytes read here, tar's
and zstd's exit statuses, the sizes; sha256 without zstd; .part + rename); scp verifies nothing.
After every run the benchmark checks the result's sha256 itself. Every measurement is repeated
(order alternating) while the machine is otherwise idle, and again while another process keeps
one core busy (a Python busy loop). Prints every run, medians and the ratio (scp time / our
time: > 1 = faster) against the targets: download >= 1.3x; upload never slower than scp (>= 1.0x)
for the ~90 MB case and >= 1.3x for the ~500 MB one. On loopback the client, sshd, tar, zstd and
the remote hash share this machine's cores. All data lives under /tmp and is removed.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the throwaway sshd helper lives in tests/

sys.path.insert(0, str(REPO / "scripts"))
from results_log import recorded  # noqa: E402  (benchmarks/, beside this file)

from mqi_communicator.files import KnownDigests  # noqa: E402
from tests.infra.sshd_fixture import SshServer  # noqa: E402

CASE_FILES = 109
TARGETS = {"download": 1.3, "upload small": 1.0, "upload large": 1.3}


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


def write_csv_folder(root: Path, n_files: int, total_bytes: int, seed: int = 7) -> float:
    """A P2-like output folder: plan/RP*.dcm and log/<beam>/<NN>_<E>MeV.csv with CRLF rows of
    ``time_ms,x_mm,y_mm,count`` (float32 shortest repr; a spot's position repeats over its ~130
    samples, as in the delivery logs), and p2_summary.json with the sha256 and stat key of every
    file, as P2 records them (hashing the bytes it writes). Returns the CPU seconds that hashing
    took: P2's share of the work the upload no longer does."""
    rng = np.random.default_rng(seed)
    known = KnownDigests()
    hashing = 0.0

    def write(path: Path, data: bytes) -> None:
        nonlocal hashing
        path.write_bytes(data)
        t0 = time.process_time()
        digest = hashlib.sha256(data).hexdigest()
        hashing += time.process_time() - t0
        known.add(path, path.relative_to(root).as_posix(), digest)

    (root / "plan").mkdir(parents=True)
    plan_size = 400_000
    write(root / "plan" / "RP.bench.dcm", b"\0" * 128 + b"DICM" + rng.bytes(plan_size - 132))
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
        write(folder / f"{layer:02d}_{180 - 1.5 * layer:.2f}MeV.csv", "".join(rows)[:per_file].encode())
    (root / "p2_summary.json").write_text(json.dumps({"files": known.entries}))
    return hashing


def tree_digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@contextlib.contextmanager
def busy_core(loaded: bool) -> Iterator[None]:
    """While ``loaded``: another process keeps one core busy (a Python busy loop)."""
    if not loaded:
        yield
        return
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        yield
    finally:
        proc.kill()
        proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dose-mb", type=int, default=500)
    parser.add_argument("--case-mb", type=int, nargs="+", default=[90, 500], help="case folder sizes (MB)")
    parser.add_argument("--conditions", nargs="+", choices=["idle", "loaded"], default=["idle", "loaded"])
    args = parser.parse_args()
    if not shutil.which("scp"):
        print("scp not found (apt-get install openssh-client)", file=sys.stderr)
        return 2

    # byte-compiled first, as an installed package is (PYTHONDONTWRITEBYTECODE would otherwise make
    # every run compile the package again)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "scripts" / "mqi_communicator")], check=True)
    work = Path(tempfile.mkdtemp(prefix="mqi-xfer-bench-", dir="/tmp"))
    server = SshServer(Path(tempfile.mkdtemp(prefix="mqi-sshd-bench-", dir="/tmp")))
    try:
        server.start()
        ssh_cfg = ["-F", str(server.ssh_config)]
        cli = [sys.executable, "-m", "mqi_communicator.remote.transfer"]
        conn = [
            *("--host", server.host, "--port", str(server.port), "--user", server.user),
            *("--key", str(server.key), "--known-hosts", str(server.known_hosts)),
        ]

        t0 = time.perf_counter()
        dose_size = args.dose_mb * 1_000_000
        dose = server.remote_dir / "dose.raw"
        zero_fraction = write_dose_volume(dose, dose_size)
        if os.geteuid() == 0:
            shutil.chown(dose, server.user, server.user)
        dose_sha = sha256(dose)
        cases: dict[str, tuple[Path, dict[str, str]]] = {}
        p2_hashing: dict[str, float] = {}
        for mb in args.case_mb:
            src = work / f"case{mb}" / "moqui_csv"
            p2_hashing[f"{mb} MB"] = write_csv_folder(src, CASE_FILES, mb * 1_000_000)
            cases[f"upload {mb} MB"] = (src, tree_digests(src))
        print(
            f"data: dose volume {dose_size / 1e6:.0f} MB ({zero_fraction:.0%} zero voxels); case folders "
            + ", ".join(
                f"{len(d)} files {sum((s / r).stat().st_size for r in d) / 1e6:.0f} MB" for s, d in cases.values()
            )
            + f" (made in {time.perf_counter() - t0:.0f} s)"
        )
        print(
            "P2 hashes what it writes (the upload takes those digests, not timed below): "
            + ", ".join(f"{t:.2f} CPU-s for the {mb} case" for mb, t in p2_hashing.items())
        )
        print(f"server: OpenSSH on 127.0.0.1:{server.port}; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")

        local = work / "dl" / "dose.raw"
        up = server.remote_dir / "up"

        def run(command: list[str]) -> None:
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)

        def clean() -> None:
            shutil.rmtree(local.parent, ignore_errors=True)
            local.parent.mkdir()
            shutil.rmtree(up, ignore_errors=True)

        # operation -> (size, {tool: command}, check)
        ops: dict[str, tuple[int, dict[str, list[str]], Callable[[], None]]] = {}

        def check_download() -> None:
            assert sha256(local) == dose_sha, "downloaded dose differs"

        ops["download dose"] = (
            dose_size,
            {
                "ours": [*cli, "download", str(dose), str(local), *conn, "--expected-sha256", dose_sha],
                "scp": ["scp", "-q", *ssh_cfg, f"sshd-test:{dose}", str(local)],
            },
            check_download,
        )
        for name, (src, digests) in cases.items():

            def check_upload(digests: dict[str, str] = digests) -> None:
                assert tree_digests(up) == digests, "uploaded case differs"

            size = sum((src / rel).stat().st_size for rel in digests)
            ops[name] = (
                size,
                {
                    "ours": [*cli, "upload", str(src), str(up), *conn, "--known-digests", str(src / "p2_summary.json")],
                    "scp": ["scp", "-q", "-r", *ssh_cfg, str(src), f"sshd-test:{up}"],
                },
                check_upload,
            )

        seconds: dict[tuple[str, str, str], list[float]] = {}
        for condition in args.conditions:
            with busy_core(condition == "loaded"):
                for repeat in range(args.repeats):
                    for op, (_, tools, check) in ops.items():
                        order = list(tools.items())
                        if repeat % 2:
                            order.reverse()
                        for tool, command in order:
                            clean()
                            subprocess.run(["sync"], check=False)  # no writeback of the last run during this one
                            t0 = time.perf_counter()
                            run(command)
                            seconds.setdefault((condition, op, tool), []).append(time.perf_counter() - t0)
                            check()
                    print(f"{condition}: repeat {repeat + 1}/{args.repeats} done (load {os.getloadavg()[0]:.2f})")
            clean()

        print()
        header = f"{'':16}" + "".join(
            f" | {c + ': ours (s)':>22} {'scp (s)':>20} {'ratio':>6}" for c in args.conditions
        )
        print(header)
        verdicts = []
        for op, (size, _, _) in ops.items():
            target = TARGETS["download"] if op.startswith("download") else None
            if target is None:
                target = TARGETS["upload small"] if size < 200e6 else TARGETS["upload large"]
            row = f"{op:16}"
            for condition in args.conditions:
                ours, scp = seconds[(condition, op, "ours")], seconds[(condition, op, "scp")]
                ratio = statistics.median(scp) / statistics.median(ours)
                runs = lambda xs: "/".join(f"{x:.2f}" for x in xs)  # noqa: E731
                row += f" | {runs(ours):>22} {runs(scp):>20} {ratio:5.2f}x"
                verdicts.append(
                    f"{op} {condition}: {ratio:.2f}x scp (median {statistics.median(ours):.2f} s vs "
                    f"{statistics.median(scp):.2f} s; target >= {target}x) {'MET' if ratio >= target else 'MISSED'}"
                )
            print(row)
        print(f"\nratio = median scp time / median our time, medians of {args.repeats}, sha256 checked:")
        print("  " + "\n  ".join(verdicts))
    finally:
        try:
            server.stop(keep=False)
        finally:
            shutil.rmtree(server.state_dir, ignore_errors=True)
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(recorded("transfer_vs_scp", main))
