"""Pass rates per room over time with TG-218 process-based limits; the QA CLIs answer --help."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mqi_communicator.qa import trend, trend_points

REPO = Path(__file__).resolve().parents[1]


GAMMA = {"criteria": "3%/2mm global", "cutoff_percent": 10.0}


def write_qa(
    path: Path,
    room: str,
    written: str,
    rates: list[float | None],
    case_id: str | None = None,
    *,
    delivered: str | None = None,
    engine: str = "MOQUI",
    comparison: str = "absolute",
    labels: list[str] | None = None,
    gamma: dict | None = None,
) -> Path:
    """A case's qa.json at `path` (beams B0, B1, ... numbered 1, 2, ...) and, for a log-based case,
    its intake.json beside the qa/ folder with one delivery per beam at `delivered` (16 digits,
    default: the day of `written` at 09:00)."""
    case_id = case_id or path.stem
    beams = [
        {
            "number": k + 1,
            "name": f"B{k}",
            "dose": {"gamma_primary": {**(gamma or GAMMA), "pass_rate_percent": rate}, "comparison": comparison}
            if rate is not None
            else {"verdict": "ERROR"},
            "delivery": {"verdict": "NOT APPLICABLE" if labels and "PLAN-BASED" in labels else "PASS"},
        }
        for k, rate in enumerate(rates)
    ]
    qa = {"case_id": case_id, "room": room, "beams": beams, "provenance": {"written": written, "engine": engine}}
    if labels is not None:
        qa["labels"] = labels
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(qa))
    stamp = delivered or written[:10].replace("-", "") + "09000000"
    manifest = {
        "case_id": case_id,
        "mode": "plan" if labels and "PLAN-BASED" in labels else "logs",
        "deliveries": [
            {"folder": f"{stamp[:-2]}{k:02d}", "irradiation_time": f"{stamp[:-2]}{k:02d}"} for k in range(len(rates))
        ],
        "beams": [{"number": k + 1, "simulated_deliveries": [f"{stamp[:-2]}{k:02d}"]} for k in range(len(rates))],
    }
    (path.parent.parent / "intake.json").write_text(json.dumps(manifest))
    return path


def case_qa(root: Path, case_id: str, *args: object, **kwargs: object) -> Path:
    """write_qa in the pipeline's layout: <root>/<case>/intermediate/qa/qa.json."""
    return write_qa(root / case_id / "intermediate" / "qa" / "qa.json", *args, case_id=case_id, **kwargs)  # type: ignore[arg-type]


def the(result: dict, **fields: str) -> dict:
    """The one stratum of a trend result whose fields are `fields`."""
    [stratum] = [s for s in result["strata"].values() if all(s.get(k) == v for k, v in fields.items())]
    return stratum


def test_control_limits_of_an_individuals_chart() -> None:
    limits = trend.control_limits([98.0, 99.0, 97.0, 99.0])
    assert limits is not None
    # mean 98.25, mean moving range (1 + 2 + 2) / 3
    assert limits["centre"] == pytest.approx(98.25)
    assert limits["lower"] == pytest.approx(98.25 - 2.66 * 5 / 3)
    assert limits["upper"] == 100.0
    assert trend.control_limits([99.0]) is None


def test_a_beam_is_judged_against_20_earlier_beams_never_itself(tmp_path: Path) -> None:
    rates = [99.0, 99.4] * 10 + [96.0, 99.2]
    files = [
        case_qa(tmp_path, f"c{k:02d}", "G1", f"2026-10-{1 + k:02d}T10:00:00+00:00", [rate])
        for k, rate in enumerate(rates)
    ]
    stratum = the(trend.trend(trend_points.points(files)))
    judged = stratum["points"]
    # The first 20 have fewer than 20 earlier beams: not judged, whatever their rate.
    assert [p["baseline_points"] for p in judged[:21]] == list(range(21))
    assert all(p["limits"] is None and not p["out_of_control"] for p in judged[:20])
    # The 21st (96 %, passing TG-218's universal 95 %) against the 20 before it: out of control.
    assert judged[20]["limits"] == trend.control_limits(rates[:20])
    assert judged[20]["limits"]["centre"] == pytest.approx(99.2)
    assert judged[20]["limits"]["lower"] == pytest.approx(99.2 - 2.66 * 0.4)
    assert judged[20]["out_of_control"]
    # The 22nd's limits include the 96 % (it was delivered before) but not its own 99.2 %.
    assert judged[21]["limits"] == trend.control_limits(rates[:21]) and not judged[21]["out_of_control"]
    # The limits drawn for the next beam are those of the latest beams.
    assert stratum["limits"] == trend.control_limits(rates)


def test_with_fewer_than_20_earlier_beams_nothing_is_judged(tmp_path: Path) -> None:
    files = [
        case_qa(tmp_path, f"c{k:02d}", "G2", f"2026-10-{1 + k:02d}T10:00:00+00:00", [99.5 if k < 19 else 80.0])
        for k in range(20)
    ]
    stratum = the(trend.trend(trend_points.points(files), min_cases=20))
    assert stratum["points"][-1]["baseline_points"] == 19
    assert not any(p["out_of_control"] for p in stratum["points"])
    assert stratum["limits"] == trend.control_limits([p["pass_rate_percent"] for p in stratum["points"]])
    # The site may ask for more, never use fewer than the configured number.
    stratum = the(trend.trend(trend_points.points(files), min_cases=19))
    assert stratum["points"][-1]["out_of_control"]


def test_unlike_results_are_not_pooled(tmp_path: Path) -> None:
    """25 beams of one process and, interleaved in time, 25 of each other kind with lower rates:
    each series has its own points and limits, as if the others did not exist."""
    kinds = {
        "reference": {},
        "room": {"room": "G1"},
        "engine": {"engine": "built-in analytical pencil beam"},
        "mode": {"labels": ["PLAN-BASED"]},
        "comparison": {"comparison": "relative"},
        "criteria": {"gamma": {"criteria": "2%/2mm global", "cutoff_percent": 10.0}},
    }
    files = []
    for k in range(25):
        for n, (kind, options) in enumerate(kinds.items()):
            rate = 99.5 - 0.2 * (k % 2) if kind == "reference" else 90.0 + n + (k % 3)
            day = f"2026-09-01T{k // 4:02d}:{(k % 4) * 15:02d}:{n:02d}+00:00"
            stamp = f"202609{1 + k:02d}0900{n:02d}00"
            room = options.get("room", "G2")
            rest = {key: v for key, v in options.items() if key != "room"}
            files.append(case_qa(tmp_path, f"{kind}{k:02d}", room, day, [rate], delivered=stamp, **rest))
    result = trend.trend(trend_points.points(files))
    assert len(result["strata"]) == len(kinds)
    reference = the(
        result,
        room="G2",
        engine="MOQUI",
        mode="log-based",
        comparison="absolute",
        criteria="3%/2mm global, cutoff 10 %",
    )
    assert {p["case_id"][:-2] for p in reference["points"]} == {"reference"}
    assert reference["limits"] == trend.control_limits([99.5, 99.3] * 12 + [99.5])
    assert the(result, mode="plan-based")["criteria"] == "3%/2mm global, cutoff 10 %"
    assert the(result, criteria="2%/2mm global, cutoff 10 %")["comparison"] == "absolute"
    for stratum in result["strata"].values():
        assert len(stratum["points"]) == 25
        assert not any(p["out_of_control"] for p in stratum["points"])


def test_order_is_by_delivery_not_by_qa_time(tmp_path: Path) -> None:
    """A case delivered first but assessed last (its logs arrived late) takes its delivery place."""
    early = case_qa(tmp_path, "late_qa", "G2", "2026-11-20T10:00:00+00:00", [99.0], delivered="2026110108000000")
    mid = case_qa(tmp_path, "mid", "G2", "2026-11-05T10:00:00+00:00", [98.0], delivered="2026110509000000")
    last = case_qa(tmp_path, "first_qa", "G2", "2026-11-02T10:00:00+00:00", [97.0], delivered="2026111009000000")
    stratum = the(trend.trend(trend_points.points([last, mid, early])))
    assert [p["case_id"] for p in stratum["points"]] == ["late_qa", "mid", "first_qa"]
    assert [p["time"] for p in stratum["points"]] == ["2026110108000000", "2026110509000000", "2026111009000000"]


def test_delivery_time_comes_from_the_intake_manifest(tmp_path: Path, config: dict) -> None:
    """A real intake.json (tests/casegen.py, the later beam number delivered first): each beam's
    point has its own fraction's irradiation time."""
    from mqi_communicator.intake.case import build_manifest
    from tests import casegen

    case = casegen.write_case(tmp_path / "scan", "rev", reversed_order=True)
    manifest = build_manifest(case, config)
    beams = [b for b in manifest["beams"] if b["simulate"]]
    qa = {
        "case_id": "rev",
        "room": manifest["room"],
        "provenance": {"written": "2026-12-01T10:00:00+00:00", "engine": "MOQUI"},
        "beams": [
            {"number": b["number"], "name": b["name"], "dose": {"gamma_primary": {**GAMMA, "pass_rate_percent": 99.0}, "comparison": "absolute"}}
            for b in beams
        ],
    }  # fmt: skip
    stratum = the(trend.trend(trend_points.beam_points(qa, manifest)))
    folders = {d["beam_number"]: d["irradiation_time"] for d in manifest["deliveries"]}
    assert [(p["beam"], p["time"]) for p in stratum["points"]] == sorted(
        [(b["name"], folders[b["number"]]) for b in beams], key=lambda item: item[1]
    )
    assert stratum["points"][0]["beam"] == beams[-1]["name"]  # the later beam number, delivered first


def test_without_intake_manifest_the_time_is_the_fraction_qa_recorded(tmp_path: Path) -> None:
    qa = json.loads(case_qa(tmp_path, "c", "G2", "2026-11-02T10:00:00+00:00", [99.0, 98.0]).read_text())
    qa["fraction_assessed"] = {"source": "logs", "first_irradiation": "2026103107300000"}
    [point, _] = trend_points.beam_points(qa, None)
    assert (point["time"], point["time_source"], point["mode"]) == ("2026103107300000", "delivery", "log-based")
    del qa["fraction_assessed"]
    [point, _] = trend_points.beam_points(qa, None)
    assert point["stratum"] == "unknown" and point["unknown_because"] == "no time"


def test_the_trend_shows_the_latest_window_and_judges_against_it(tmp_path: Path) -> None:
    rates = [80.0, 85.0] + [99.0, 99.2] * 3
    files = [
        case_qa(tmp_path, f"c{k}", "G1", f"2026-11-{10 + k:02d}T10:00:00+00:00", [rate]) for k, rate in enumerate(rates)
    ]
    stratum = the(trend.trend(trend_points.points(files), min_cases=3, window=4))
    assert [p["pass_rate_percent"] for p in stratum["points"]] == [99.0, 99.2, 99.0, 99.2]
    assert stratum["beams_in_history"] == 8
    assert stratum["points"][-1]["limits"] == trend.control_limits(rates[3:7])  # the 4 before it
    assert stratum["limits"]["centre"] == pytest.approx(99.1)  # the old 80 and 85 % no longer count


def test_trend_cli_writes_figure_and_json(tmp_path: Path) -> None:
    qa = case_qa(tmp_path, "c", "G2", "2026-11-01T10:00:00+00:00", [99.0])
    result = run_trend(tmp_path, "--qa", str(qa))
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"
    [stratum] = result["strata"].values()
    assert stratum["points"][0]["pass_rate_percent"] == 99.0 and result["min_cases"] == 20


def test_trend_cli_names_a_broken_qa_file(tmp_path: Path) -> None:
    broken = tmp_path / "c" / "intermediate" / "qa" / "qa.json"
    broken.parent.mkdir(parents=True)
    broken.write_text('{"case_id": "c"')
    out = subprocess.run(
        [sys.executable, "-m", "mqi_communicator.qa.trend", "--qa", str(broken), "--figure", str(tmp_path / "t.png"), "--json", str(tmp_path / "t.json")],
        capture_output=True, text=True, check=False, cwd=REPO,
    )  # fmt: skip
    assert out.returncode == 1 and f"{broken}: unreadable QA result" in out.stderr


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
        case_qa(cases, f"old{k}", "G1", f"2026-11-0{k + 1}T10:00:00+00:00", [99.0 - k])
    ledger = tmp_path / "results" / "qa_history.jsonl"
    history = str(cases / "*" / "intermediate" / "qa" / "qa.json")
    # No ledger yet: built once from every case's qa.json.
    first = run_trend(tmp_path, "--qa", "--ledger", str(ledger), "--history", history)
    [stratum] = first["strata"].values()
    assert [p["case_id"] for p in stratum["points"]] == ["old0", "old1", "old2"]
    assert len(ledger.read_text().splitlines()) == 3
    # A later run reads the ledger and its own case: the finished cases' files are not read again
    # (here they are gone, and still counted).
    for k in range(3):
        shutil.rmtree(cases / f"old{k}")
    new = case_qa(cases, "new", "G1", "2026-11-20T10:00:00+00:00", [97.0, 98.0])
    second = run_trend(tmp_path, "--qa", str(new), "--ledger", str(ledger), "--history", history)
    [stratum] = second["strata"].values()
    assert [(p["case_id"], p["beam"]) for p in stratum["points"]] == [
        ("old0", "B0"), ("old1", "B0"), ("old2", "B0"), ("new", "B0"), ("new", "B1"),
    ]  # fmt: skip
    # A reprocessed case replaces its points (here one beam is no longer assessed).
    case_qa(cases, "new", "G1", "2026-11-21T10:00:00+00:00", [96.0, None])
    third = run_trend(tmp_path, "--qa", str(new), "--ledger", str(ledger), "--history", history)
    [stratum] = third["strata"].values()
    assert [(p["case_id"], p["pass_rate_percent"]) for p in stratum["points"]][-2:] == [
        ("old2", 97.0), ("new", 96.0),
    ]  # fmt: skip
    assert len(ledger.read_text().splitlines()) == 4


def test_an_old_ledger_is_re_derived_and_what_cannot_be_goes_to_unknown(tmp_path: Path) -> None:
    """Lines written before strata (room, date of writing, case, beam, rate) are never mixed with
    the stratified points: re-derived from the case's qa.json where it still exists, else shown
    in the stratum "unknown", which is not judged."""
    cases = tmp_path / "cases"
    history = str(cases / "*" / "intermediate" / "qa" / "qa.json")
    ledger = tmp_path / "qa_history.jsonl"
    old = [
        {"room": "G2", "written": f"2026-10-{1 + k:02d}T10:00:00+00:00", "case_id": f"gone{k:02d}", "beam": "B0", "pass_rate_percent": 80.0}
        for k in range(25)
    ] + [{"room": "G2", "written": "2026-10-30T10:00:00+00:00", "case_id": "kept", "beam": "B0", "pass_rate_percent": 50.0}]  # fmt: skip
    ledger.write_text("".join(json.dumps(line) + "\n" for line in old))
    case_qa(cases, "kept", "G2", "2026-10-30T10:00:00+00:00", [99.0])
    new = case_qa(cases, "new", "G2", "2026-11-30T10:00:00+00:00", [98.0])
    result = run_trend(tmp_path, "--qa", str(new), "--ledger", str(ledger), "--history", history)
    unknown = result["strata"]["unknown"]
    assert len(unknown["points"]) == 25 and unknown["limits"] is None and "not judged" in unknown["note"]
    [known] = [s for name, s in result["strata"].items() if name != "unknown"]
    assert [(p["case_id"], p["pass_rate_percent"]) for p in known["points"]] == [("kept", 99.0), ("new", 98.0)]
    assert all("stratum" in json.loads(line) for line in ledger.read_text().splitlines())


@pytest.mark.parametrize("module", ["mqi_communicator.qa.run", "mqi_communicator.qa.trend"])
def test_cli_help(module: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", module, "--help"], capture_output=True, text=True, check=False, cwd=REPO
    )
    assert out.returncode == 0 and "usage" in out.stdout
