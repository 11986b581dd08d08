"""Pass rates per room over time with TG-218 process-based limits; the QA CLIs answer --help."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mqi_communicator.qa import trend

REPO = Path(__file__).resolve().parents[1]


def write_qa(path: Path, room: str, written: str, rates: list[float | None]) -> Path:
    beams = [
        {
            "name": f"B{k}",
            "dose": {"gamma_primary": {"pass_rate_percent": rate}} if rate is not None else {"verdict": "ERROR"},
        }
        for k, rate in enumerate(rates)
    ]
    qa = {"case_id": path.stem, "room": room, "beams": beams, "provenance": {"written": written}}
    path.write_text(json.dumps(qa))
    return path


def test_control_limits_of_an_individuals_chart() -> None:
    limits = trend.control_limits([98.0, 99.0, 97.0, 99.0])
    assert limits is not None
    # mean 98.25, mean moving range (1 + 2 + 2) / 3
    assert limits["centre"] == pytest.approx(98.25)
    assert limits["lower"] == pytest.approx(98.25 - 2.66 * 5 / 3)
    assert limits["upper"] == 100.0
    assert trend.control_limits([99.0]) is None


def test_trend_per_room_in_time_order_flags_out_of_control(tmp_path: Path) -> None:
    files = [
        write_qa(tmp_path / f"c{k}.json", "G1", f"2026-11-{10 + k:02d}T10:00:00+00:00", [rate])
        for k, rate in enumerate([99.5, 99.0, 99.6, 99.2, 99.4, 96.0])
    ]
    files.append(write_qa(tmp_path / "g2.json", "G2", "2026-11-01T10:00:00+00:00", [97.0, None]))
    result = trend.trend(list(reversed(files)), min_cases=5)
    g1 = result["rooms"]["G1"]
    assert [p["pass_rate_percent"] for p in g1["points"]] == [99.5, 99.0, 99.6, 99.2, 99.4, 96.0]
    # 96 % passes TG-218's universal 95 % but is below this site's process limit.
    assert [p["out_of_control"] for p in g1["points"]] == [False] * 5 + [True]
    g2 = result["rooms"]["G2"]
    assert g2["limits"] is None and "need 5" in g2["note"] and len(g2["points"]) == 1


def test_trend_cli_writes_figure_and_json(tmp_path: Path) -> None:
    qa = write_qa(tmp_path / "c.json", "G2", "2026-11-01T10:00:00+00:00", [99.0])
    out = subprocess.run(
        [sys.executable, "-m", "mqi_communicator.qa.trend", "--qa", str(qa), "--figure", str(tmp_path / "t.png"), "--json", str(tmp_path / "t.json")],
        capture_output=True, text=True, check=False, cwd=REPO,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "t.json").read_text())["rooms"]["G2"]["points"][0]["pass_rate_percent"] == 99.0


@pytest.mark.parametrize("module", ["mqi_communicator.qa.run", "mqi_communicator.qa.trend"])
def test_cli_help(module: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", module, "--help"], capture_output=True, text=True, check=False, cwd=REPO
    )
    assert out.returncode == 0 and "usage" in out.stdout
