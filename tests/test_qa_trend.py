"""Pass rates per room over time with TG-218 process-based limits; the QA CLIs answer --help."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mqi_communicator.qa import trend

REPO = Path(__file__).resolve().parents[1]


def write_qa(path: Path, room: str, written: str, rates: list[float | None], case_id: str | None = None) -> Path:
    beams = [
        {
            "name": f"B{k}",
            "dose": {"gamma_primary": {"pass_rate_percent": rate}} if rate is not None else {"verdict": "ERROR"},
        }
        for k, rate in enumerate(rates)
    ]
    qa = {"case_id": case_id or path.stem, "room": room, "beams": beams, "provenance": {"written": written}}
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
    result = trend.trend(trend.points(list(reversed(files))), min_cases=5)
    g1 = result["rooms"]["G1"]
    assert [p["pass_rate_percent"] for p in g1["points"]] == [99.5, 99.0, 99.6, 99.2, 99.4, 96.0]
    # 96 % passes TG-218's universal 95 % but is below this site's process limit.
    assert [p["out_of_control"] for p in g1["points"]] == [False] * 5 + [True]
    g2 = result["rooms"]["G2"]
    assert g2["limits"] is None and "need 5" in g2["note"] and len(g2["points"]) == 1


def test_the_trend_shows_and_judges_the_latest_window_of_each_room(tmp_path: Path) -> None:
    files = [
        write_qa(tmp_path / f"c{k}.json", "G1", f"2026-11-{10 + k:02d}T10:00:00+00:00", [rate])
        for k, rate in enumerate([80.0, 85.0, 99.0, 99.2, 99.4, 99.6])
    ]
    room = trend.trend(trend.points(files), min_cases=3, window=4)["rooms"]["G1"]
    assert [p["pass_rate_percent"] for p in room["points"]] == [99.0, 99.2, 99.4, 99.6]
    assert room["beams_in_history"] == 6
    assert room["limits"]["centre"] == pytest.approx(99.3)  # the old 80 and 85 % no longer count


def test_trend_cli_writes_figure_and_json(tmp_path: Path) -> None:
    qa = write_qa(tmp_path / "c.json", "G2", "2026-11-01T10:00:00+00:00", [99.0])
    out = subprocess.run(
        [sys.executable, "-m", "mqi_communicator.qa.trend", "--qa", str(qa), "--figure", str(tmp_path / "t.png"), "--json", str(tmp_path / "t.json")],
        capture_output=True, text=True, check=False, cwd=REPO,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "t.json").read_text())["rooms"]["G2"]["points"][0]["pass_rate_percent"] == 99.0


def run_trend(tmp_path: Path, *args: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "mqi_communicator.qa.trend", *args, "--figure", str(tmp_path / "t.png"), "--json", str(tmp_path / "t.json")],
        capture_output=True, text=True, check=False, cwd=REPO,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return json.loads((tmp_path / "t.json").read_text())


def test_the_ledger_makes_a_run_read_only_its_own_cases(tmp_path: Path) -> None:
    cases = tmp_path / "cases"
    for k in range(3):
        (cases / f"old{k}").mkdir(parents=True)
        write_qa(cases / f"old{k}" / "qa.json", "G1", f"2026-11-0{k + 1}T10:00:00+00:00", [99.0 - k], f"old{k}")
    ledger = tmp_path / "results" / "qa_history.jsonl"
    history = str(cases / "*" / "qa.json")
    # No ledger yet: built once from every case's qa.json.
    first = run_trend(tmp_path, "--qa", "--ledger", str(ledger), "--history", history)
    assert [p["case_id"] for p in first["rooms"]["G1"]["points"]] == ["old0", "old1", "old2"]
    assert len(ledger.read_text().splitlines()) == 3
    # A later run reads the ledger and its own case: the finished cases' files are not read again
    # (here they are gone, and still counted).
    for k in range(3):
        (cases / f"old{k}" / "qa.json").unlink()
    (cases / "new").mkdir()
    new = write_qa(cases / "new" / "qa.json", "G1", "2026-11-20T10:00:00+00:00", [97.0, 98.0], "new")
    second = run_trend(tmp_path, "--qa", str(new), "--ledger", str(ledger), "--history", history)
    assert [(p["case_id"], p["beam"]) for p in second["rooms"]["G1"]["points"]] == [
        ("old0", "B0"), ("old1", "B0"), ("old2", "B0"), ("new", "B0"), ("new", "B1"),
    ]  # fmt: skip
    # A reprocessed case replaces its points (here one beam is no longer assessed).
    write_qa(cases / "new" / "qa.json", "G1", "2026-11-21T10:00:00+00:00", [96.0, None], "new")
    third = run_trend(tmp_path, "--qa", str(new), "--ledger", str(ledger), "--history", history)
    assert [(p["case_id"], p["pass_rate_percent"]) for p in third["rooms"]["G1"]["points"]][-2:] == [
        ("old2", 97.0), ("new", 96.0),
    ]  # fmt: skip
    assert len(ledger.read_text().splitlines()) == 4


@pytest.mark.parametrize("module", ["mqi_communicator.qa.run", "mqi_communicator.qa.trend"])
def test_cli_help(module: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", module, "--help"], capture_output=True, text=True, check=False, cwd=REPO
    )
    assert out.returncode == 0 and "usage" in out.stdout
