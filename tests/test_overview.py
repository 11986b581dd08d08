"""`bin/mqi overview` opened in a real browser (headless Chromium, from disk): every finished case
with its room, dates, verdict, labels and sign-off as its own files say, links that resolve,
filters and search through the URL fragment, paging, per-room trend charts, no script errors
(docs/overview-page.md). The cases' QA is computed by the qa rule's own command (tests/qa_results)
in two rooms; signatures are made by `bin/mqi sign`, the trend by the trend rule's command."""

from __future__ import annotations

import dataclasses
import html
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from mqi_communicator import settings
from mqi_communicator.ops import overview
from tests import casegen, qa_gen, qa_results, test_qa_verdict
from tests.dciodvfy import in_ci
from tests.qa_results import CASE, REPO

MQI = str(REPO / "bin" / "mqi")
ROW = re.compile(r'<tr data-case="([^"]+)">(.*?)</tr>', re.S)
CELL = re.compile(r"<td[^>]*>(.*?)</td>", re.S)
HREF = re.compile(r'<a class="([a-z_]+)" href="([^"]+)">')
# A profile folder of each browser's own: tests running side by side never share one.
CHROMIUM = ["chromium", "--headless", "--disable-gpu", "--no-sandbox", "--user-data-dir={profile}"]


def chromium(*args: str) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        command = [arg.format(profile=profile) for arg in CHROMIUM] + ["--enable-logging=stderr", "--v=0", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


pytestmark = pytest.mark.skipif(
    shutil.which("chromium") is None and not in_ci(), reason="chromium (envs/setup.sh --dev)"
)


@pytest.fixture(scope="module")
def computed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Finished QA results of two cases: room G2 (PASS) and room G1 (its own verdict)."""
    root = tmp_path_factory.mktemp("overview")
    case = test_qa_verdict.make_case(root)
    assert qa_results.write_qa(case, root / "G2")["verdict"] == "PASS"
    spec = dataclasses.replace(test_qa_verdict.spec(), room="G1")
    g1 = casegen.write_case(root / "scan_G1", CASE, spec, samples_per_spot=20, off_samples=20)
    qa_gen.write_case_tps_doses(g1, "G1")
    assert qa_results.write_qa(g1, root / "G1")["room"] == "G1"
    return root


def mqi(workdir: Path, configfile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    run = subprocess.run(
        [MQI, *args, "--workdir", str(workdir), "--configfile", str(configfile)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    return run


# Case id -> (room of its result, who signs it or "", whether its qa.json changes after signing).
CASES = {
    "a_g2_unsigned": ("G2", "", False),
    "b_g2_signed": ("G2", "Dr Sign", False),
    "c_g1": ("G1", "", False),
    "d_g2_void": ("G2", "Dr Void", True),
}


@pytest.fixture(scope="module")
def built(computed: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A site (work/, scan/) with the CASES finished, signed by `bin/mqi sign`, and the QA trend
    of all of them written by the trend rule's command."""
    tmp_path = tmp_path_factory.mktemp("site")
    workdir, configfile, layout = qa_results.site(tmp_path)
    for case_id, (room, signer, edited) in CASES.items():
        shutil.copytree(computed / ("scan" if room == "G2" else "scan_G1") / CASE, tmp_path / "scan" / case_id)
        shutil.copytree(computed / room, layout.processing(case_id))
        if signer:
            mqi(workdir, configfile, "sign", case_id, "--by", signer, "--comment", "reviewed")
        if edited:  # results changed after signing: the signature is void (docs/sign-off.md)
            qa_json = layout.processing(case_id) / "qa" / "qa.json"
            qa_json.write_text(qa_json.read_text() + "\n")
    qa_files = [str(layout.processing(case_id) / "qa" / "qa.json") for case_id in CASES]
    trend = [sys.executable, "-m", "mqi_communicator.qa.trend", "--qa", *qa_files, "--min-cases", "2"]
    trend += ["--ledger", "results/qa_history.jsonl", "--figure", "results/qa_trend.png"]
    subprocess.run([*trend, "--json", "results/qa_trend.json"], cwd=workdir, check=True)
    return tmp_path


@pytest.fixture
def site(built: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the built site of its own (a test may sign, add cases, write the page)."""
    for name in ("work", "scan"):
        shutil.copytree(built / name, tmp_path / name, symlinks=True)
    configfile = tmp_path / "work" / "site.yaml"
    configfile.write_text(configfile.read_text().replace(str(built), str(tmp_path)))
    return tmp_path / "work", configfile


def browse(page: Path, fragment: str = "", screenshot: Path | None = None) -> tuple[str, dict[str, list[str]]]:
    """The page's DOM after its script ran (Chromium from disk), and its rows' cells by case;
    asserts that no script error reached the page or the console."""
    url = page.as_uri() + (f"#{fragment}" if fragment else "")
    shot = [f"--screenshot={screenshot}", "--window-size=1280,900"] if screenshot is not None else []
    run = chromium(*shot, "--dump-dom", url)
    assert run.returncode == 0, run.stderr
    assert "Uncaught" not in run.stderr and "CONSOLE" not in run.stderr, run.stderr
    errors = re.search(r'<div id="errors">(.*?)</div>', run.stdout, re.S)
    assert errors is not None and errors.group(1) == "", errors
    rows = {
        case: [" ".join(html.unescape(re.sub("<[^>]+>", " ", c)).split()) for c in CELL.findall(body)]
        for case, body in ROW.findall(table_of(run.stdout))
    }
    return run.stdout, rows


def table_of(dom: str) -> str:
    """The rendered table body (the DOM holds the page's script too)."""
    found = re.search(r'<tbody id="rows">(.*?)</tbody>', dom, re.S)
    assert found is not None
    return found.group(1)


def test_every_case_shows_its_own_files_facts_and_its_links_resolve(site: tuple[Path, Path], tmp_path: Path) -> None:
    workdir, configfile = site
    page = Path(mqi(workdir, configfile, "overview").stdout.strip())
    assert page == workdir / "results" / "overview" / "index.html"
    shot = tmp_path / "overview.png"
    dom, rows = browse(page, screenshot=shot)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(rows) == set(CASES)
    for case_id, (room, signer, edited) in CASES.items():
        processing = workdir / "data" / "cases" / case_id / "intermediate"
        qa = json.loads((processing / "qa" / "qa.json").read_text())
        summary = json.loads((processing / "case_summary.json").read_text())
        cells = rows[case_id]
        assert cells[1] == qa["room"] == room
        assert cells[3] == "{}-{}-{}".format(
            *re.match(r"(\d{4})(\d\d)(\d\d)", qa["fraction_assessed"]["first_irradiation"]).groups()
        )  # type: ignore[union-attr]
        assert cells[4] == summary["qa"]["verdict"] == qa["verdict"]
        expected = "unsigned" if not signer else "VOID" if edited else f"signed by {signer}"
        assert cells[6].startswith(expected), cells
        body = dict(ROW.findall(table_of(dom)))[case_id]
        links = dict(HREF.findall(body))
        assert set(links) == ({"sheet", "pdf", "signed_pdf"} if signer and not edited else {"sheet", "pdf"})
        for name, href in links.items():
            target = (page.parent / html.unescape(href)).resolve()
            assert target.is_file(), (name, href)
        assert (page.parent / links["sheet"]).resolve() == processing / "qa" / "qa_sheet.html"
    assert f"{len(CASES)} of {len(CASES)} cases match" in dom
    # The sheet a link leads to opens in the browser too, and is the case's.
    sheet_link = dict(HREF.findall(dict(ROW.findall(table_of(dom)))["c_g1"]))["sheet"]
    sheet_url = (page.parent / html.unescape(sheet_link)).resolve().as_uri()
    sheet = chromium("--dump-dom", sheet_url)
    assert sheet.returncode == 0 and "Uncaught" not in sheet.stderr, sheet.stderr
    assert rows["c_g1"][4] in sheet.stdout and "G1" in sheet.stdout
    today = time.strftime("%Y-%m-%d")  # finished today (the summaries were just written)
    _, rows = browse(page, f"from={today}&to={today}")
    assert set(rows) == set(CASES)


@pytest.mark.parametrize(
    ("fragment", "expected"),
    [
        ("room=G1", {"c_g1"}),
        ("room=G2&unsigned=1", {"a_g2_unsigned", "d_g2_void"}),
        ("verdict=PASS&room=G2", {"a_g2_unsigned", "b_g2_signed", "d_g2_void"}),
        ("q=dr%20sign", {"b_g2_signed"}),
        ("from=2000-01-01&to=2000-12-31", set()),
    ],
)
def test_filters_and_search_choose_the_rows(site: tuple[Path, Path], fragment: str, expected: set[str]) -> None:
    workdir, configfile = site
    page = Path(mqi(workdir, configfile, "overview").stdout.strip())
    _, rows = browse(page, fragment)
    assert set(rows) == expected
    if "verdict=PASS" in fragment:
        assert all(cells[4] == "PASS" for cells in rows.values())


def test_trend_is_drawn_per_room_from_the_trend_rules_json(site: tuple[Path, Path]) -> None:
    workdir, configfile = site
    trend = json.loads((workdir / "results" / "qa_trend.json").read_text())
    page = Path(mqi(workdir, configfile, "overview").stdout.strip())
    dom, _ = browse(page)
    sections = dict(re.findall(r'<section class="room-trend" data-room="([^"]+)">(.*?)</section>', dom, re.S))
    assert set(sections) == {"G1", "G2"}
    for room, body in sections.items():
        strata = [s for name, s in trend["strata"].items() if name.startswith(f"{room} |")]
        drawn = len(re.findall(r'<circle[^>]*class="(?:point|out)"', body))
        assert drawn == sum(len(s["points"]) for s in strata) > 0
    dom, _ = browse(page, "room=G1")
    assert re.findall(r'data-room="([^"]+)"', dom) == ["G1"]


def test_a_signature_after_the_page_was_written_shows_when_it_is_written_again(site: tuple[Path, Path]) -> None:
    workdir, configfile = site
    page = Path(mqi(workdir, configfile, "overview").stdout.strip())
    assert (workdir / overview.INDEX).is_file()
    mqi(workdir, configfile, "sign", "a_g2_unsigned", "--by", "Dr Later")
    mqi(workdir, configfile, "overview")
    _, rows = browse(page, "q=a_g2")
    assert rows["a_g2_unsigned"][6].startswith("signed by Dr Later")


def test_an_archived_case_still_shows_with_links_into_the_archive(site: tuple[Path, Path], tmp_path: Path) -> None:
    workdir, configfile = site
    summary = workdir / "data" / "cases" / "b_g2_signed" / "intermediate" / "case_summary.json"
    old = time.time() - 10 * 86400
    os.utime(summary, (old, old))
    page = Path(mqi(workdir, configfile, "overview").stdout.strip())
    mqi(workdir, configfile, "archive", str(tmp_path / "archive"), "--older-than", "5")
    assert not summary.exists()
    mqi(workdir, configfile, "overview")
    dom, rows = browse(page)
    assert set(rows) == set(CASES)
    cells = rows["b_g2_signed"]
    assert cells[0] == "b_g2_signed (archived)" and cells[1] == "G2" and cells[6].startswith("signed by Dr Sign")
    links = dict(HREF.findall(dict(ROW.findall(table_of(dom)))["b_g2_signed"]))
    assert set(links) == {"sheet", "pdf", "signed_pdf"}
    for href in links.values():
        target = (page.parent / html.unescape(href)).resolve()
        assert target.is_file() and target.is_relative_to(tmp_path / "archive" / "b_g2_signed"), href


def test_many_cases_are_paged(site: tuple[Path, Path], tmp_path: Path) -> None:
    """230 finished cases (copies of a real result's summary, qa.json and sheet): 100 a page."""
    workdir, configfile = site
    source = workdir / "data" / "cases" / "a_g2_unsigned" / "intermediate"
    for number in range(230 - len(CASES)):
        case_id = f"bulk_{number:04d}"
        (tmp_path / "scan" / case_id).mkdir()
        target = workdir / "data" / "cases" / case_id / "intermediate"
        (target / "qa").mkdir(parents=True)
        for name in ("case_summary.json", "qa/qa.json", "qa/qa_sheet.html"):
            shutil.copy2(source / name, target / name)
    page = Path(mqi(workdir, configfile, "overview").stdout.strip())
    dom, rows = browse(page)
    assert len(rows) == 100 and "page 1 of 3" in dom
    dom, rows = browse(page, "page=3")
    assert len(rows) == 30 and "cases 201\u2013230 of 230" in html.unescape(dom)


def test_a_run_end_regeneration_that_fails_says_so_and_does_not_raise(
    site: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    workdir, configfile = site
    (workdir / overview.DEFAULT_OUTPUT).parent.mkdir(parents=True, exist_ok=True)
    (workdir / overview.DEFAULT_OUTPUT).write_text("a file where the page's folder goes")
    overview.regenerate_after_run(settings.load_site(str(configfile), workdir), workdir)
    assert "mqi overview: not regenerated" in capsys.readouterr().err
    assert os.path.isfile(workdir / overview.DEFAULT_OUTPUT)


def test_a_workflow_run_writes_the_page_at_its_end(tmp_path: Path) -> None:
    """The run recorder regenerates the page when a real run (embedded default engine) ends; a
    case that failed in that run, and one still waiting for its files, are on it with their state."""
    from tests.workflow import full_log, snakemake, write_config

    case = test_qa_verdict.make_case(tmp_path)
    broken = case.parent / "broken_case"  # ready, but its plan is not DICOM: intake fails it
    broken.mkdir()
    (broken / "RP.broken.dcm").write_bytes(b"not a DICOM file")
    (broken / "_CASE_READY").touch()
    (case.parent / "still_arriving").mkdir()  # no _CASE_READY yet
    work = tmp_path / "work"
    work.mkdir()
    write_config(work, case.parent)
    run = snakemake(work, timeout=600)
    qa_path = work / "data" / "cases" / CASE / "intermediate" / "qa" / "qa.json"
    assert qa_path.is_file(), (run.stdout + run.stderr)[-3000:] + full_log(run)[-3000:]
    qa = json.loads(qa_path.read_text())
    dom, rows = browse(work / "results" / "overview" / "index.html")
    assert rows[CASE][1] == qa["room"] and rows[CASE][4] == qa["verdict"] and rows[CASE][6] == "unsigned"
    # As `bin/mqi status` says it: the failure and its reason, the waiting case and why.
    seen = json.loads(
        subprocess.run(
            [MQI, "status", "--json", "--all", "--workdir", str(work), "--configfile", str(work / "test-config.yaml")],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    states = {c["case_id"]: c for c in seen["cases"]}
    assert states["broken_case"]["state"] == "failed" and states["still_arriving"]["state"] == "waiting"
    assert rows["broken_case"][0] == "broken_case (failed)" and rows["broken_case"][4] == "FAILED"
    assert states["broken_case"]["reason"] in rows["broken_case"][5]
    assert rows["still_arriving"][0] == "still_arriving (waiting)" and rows["still_arriving"][4] == "WAITING"
    assert rows["still_arriving"][5] == "no _CASE_READY yet"
    sheet = dict(HREF.findall(table_of(dom)))["sheet"]
    assert (
        work / "results" / "overview" / sheet
    ).resolve() == work / "data" / "cases" / CASE / "intermediate" / "qa" / "qa_sheet.html"


def test_a_missing_scan_folder_is_named_not_a_traceback(tmp_path: Path) -> None:
    workdir, configfile, layout = qa_results.site(tmp_path)
    run = subprocess.run(
        [MQI, "overview", "--workdir", str(workdir), "--configfile", str(configfile)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 2
    assert f"the scan folder {layout.scan_dir} (paths.local.scan_directory) is not a folder" in run.stderr
    assert "Traceback" not in run.stderr
