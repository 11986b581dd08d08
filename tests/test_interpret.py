from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mqi_communicator.files import sha256_of, stat_key
from mqi_communicator.formats import moqui_csv, ptn
from mqi_communicator.formats.plan import read_plan
from mqi_communicator.intake.case import build_manifest
from mqi_communicator.interpret import check_layout, interpret_case, main
from tests import casegen

RANGE_FACTORS = [0.3404, 1.0, 2.978723404255319, 8.936170212765957, 26.80851063829787]


def _expected_rows(log: np.ndarray, room: str, code: int, dividing: float = 1.0) -> list[bytes]:
    """Independent per-row reference: docs/design.md#moqui-csv written out sample by sample."""
    cal = casegen.ROOMS[room]
    rows = []
    for i, row in enumerate(log):
        t = np.float32(i * cal.timegain_ms)
        # The plan frame: G2 logs x mirrored (docs/log-plan-frame.md).
        x = np.float32((int(row[0]) - cal.x_offset) * cal.x_gain_mm * {"G1": 1, "G2": -1}[room])
        y = np.float32((int(row[1]) - cal.y_offset) * cal.y_gain_mm)
        count = int(np.rint(int(row[4]) * RANGE_FACTORS[code - 1] / dividing))
        rows.append(",".join([str(t), str(x), str(y), str(count)]).encode())  # str(): float32 shortest repr
    return rows


@pytest.mark.parametrize("room", ["G1", "G2"])
def test_csv_values_match_ptn_bytes(tmp_path: Path, config: dict, room: str) -> None:
    spec = casegen.standard_case(room=room)
    codes = [1, 3, 4, 5]  # every non-unit monitor range, code 1 = 0.3404 (not mqi_interpreter's 1.0)
    case = casegen.write_case(tmp_path, "c1", spec, range_codes=codes, samples_per_spot=60)
    out = tmp_path / "p2"
    manifest = build_manifest(case, config)
    interpret_case(manifest, config, out)
    check_layout(manifest, out)
    delivery = next(d for d in manifest["deliveries"] if d["beam_number"] == 2)
    for k, entry in enumerate(delivery["ptn"], start=1):
        raw = (case / delivery["folder"] / entry["file"]).read_bytes()
        log = np.frombuffer(raw, dtype=">u2").reshape(-1, 8)
        csv_bytes = (out / "log" / "1G180_TX" / moqui_csv.layer_file_name(k, 155.0 - 5 * k)).read_bytes()
        assert csv_bytes.endswith(b"\r\n") and b"\n" not in csv_bytes.replace(b"\r\n", b"")
        assert csv_bytes.split(b"\r\n")[:-1] == _expected_rows(log, room, codes[k - 1])
        # Values parse back to float32 exactly; beam-off rows (parked) are kept.
        values = moqui_csv.read_layer(out / "log" / "1G180_TX" / moqui_csv.layer_file_name(k, 155.0 - 5 * k))
        assert len(values) == len(log)
        assert (np.abs(values[:, 1]) > 290).sum() >= 200  # parked at log x +295 mm (plan x -295 on G2)


def test_p2_records_the_sha256_of_every_file_it_writes(tmp_path: Path, config: dict) -> None:
    """The summary's "files": each file P2 wrote (plan copy and every layer CSV) with the sha256
    of its bytes and its stat key, which stage-in takes instead of hashing the files again."""
    case = casegen.write_case(tmp_path, "c1")
    out = tmp_path / "p2"
    summary = interpret_case(build_manifest(case, config), config, out)
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert sorted(e["path"] for e in summary["files"]) == written and len(written) == 9
    for entry in summary["files"]:
        path = out / entry["path"]
        assert entry["sha256"] == sha256_of(path), entry["path"]
        assert entry["stat_key"] == list(stat_key(path.stat())), entry["path"]


def test_layout_names_and_reversed_order(tmp_path: Path, config: dict) -> None:
    """Beam folders follow DICOM_BEAM_NUMBER even when deliveries arrive in reverse order."""
    spec = casegen.standard_case()
    # Beam 2 and beam 3 get different spot grids, so a swapped pairing cannot go unnoticed.
    spec.beams[2].spots_xy_mm = [[(60.0, -40.0)]] * 4
    case = casegen.write_case(tmp_path, "c1", spec, reversed_order=True)
    out = tmp_path / "p2"
    manifest = build_manifest(case, config)
    interpret_case(manifest, config, out)
    assert (out / "plan" / "RP.c1.dcm").read_bytes() == (case / "RP.c1.dcm").read_bytes()
    assert sorted(p.name for p in (out / "log").iterdir()) == ["1G180_TX", "2G90"]
    assert sorted(p.name for p in (out / "log" / "1G180_TX").iterdir()) == [
        "01_150.00MeV.csv",
        "02_145.00MeV.csv",
        "03_140.00MeV.csv",
        "04_135.00MeV.csv",
    ]
    assert sorted(p.name for p in (out / "log" / "2G90").iterdir())[0] == "01_140.00MeV.csv"
    for name in ("01_140.00MeV.csv", "04_125.00MeV.csv"):
        values = moqui_csv.read_layer(out / "log" / "2G90" / name)
        on = values[values[:, 3] > 100]
        assert np.allclose(on[:, 1].mean(), 60.0, atol=0.5) and np.allclose(on[:, 2].mean(), -40.0, atol=0.5)
    values = moqui_csv.read_layer(out / "log" / "1G180_TX" / "01_150.00MeV.csv")
    on = values[values[:, 3] > 100]
    assert abs(on[:, 1].mean()) < 1.0  # the symmetric 5x5 grid of beam 2


def test_counts_sum_to_planned_mu(tmp_path: Path, config: dict) -> None:
    spec = casegen.standard_case()
    case = casegen.write_case(tmp_path, "c1", spec, range_codes=[2, 3, 2, 3])
    out = tmp_path / "p2"
    interpret_case(build_manifest(case, config), config, out)
    plan = read_plan(case / "RP.c1.dcm")
    cal = casegen.ROOMS["G2"]
    for k, layer in enumerate(plan.beam(2).layers, start=1):  # type: ignore[union-attr]
        values = moqui_csv.read_layer(out / "log" / "1G180_TX" / moqui_csv.layer_file_name(k, layer.energy_mev))
        delivered_mu = values[:, 3].sum() * cal.mu_per_count(layer.energy_mev)
        assert delivered_mu == pytest.approx(layer.mu, rel=2e-3)


def test_single_line_layout(tmp_path: Path, config: dict) -> None:
    case = casegen.write_case(tmp_path, "c1")
    manifest = build_manifest(case, config)
    interpret_case(manifest, config, tmp_path / "rows")
    config["interpreter"]["csv_layout"] = "single_line"
    interpret_case(manifest, config, tmp_path / "single")
    rows_file = tmp_path / "rows" / "log" / "2G90" / "02_135.00MeV.csv"
    single_file = tmp_path / "single" / "log" / "2G90" / "02_135.00MeV.csv"
    text = single_file.read_bytes()
    assert text.count(b"\n") == 1 and text.endswith(b"\n") and b"\r" not in text
    np.testing.assert_allclose(moqui_csv.read_layer(single_file), moqui_csv.read_layer(rows_file), atol=5e-6)


def test_legacy_single_line_reference_round_trip(reference_data: Path) -> None:
    """The clinic's real single-line file reads, and our writer reproduces it byte for byte."""
    path = reference_data / "legacy_single_line_2S110_01_110MeV.csv"
    values = moqui_csv.read_layer(path)
    assert values.shape == (54905, 4)
    np.testing.assert_allclose(np.diff(values[:, 0]), 0.06, atol=2e-4)  # float32 time stamps
    assert moqui_csv.energy_of_file_name("01_110.00MeV.csv") == 110.0
    encoded = moqui_csv.encode_values(values[:, 0], values[:, 1], values[:, 2], values[:, 3].astype(int), "single_line")
    assert encoded == path.read_bytes()


def test_plan_based_mode_from_reference_plan(tmp_path: Path, reference_data: Path, config: dict) -> None:
    case = tmp_path / "phantom"
    case.mkdir()
    (case / "RP_G2_9spots_phantom.dcm").write_bytes((reference_data / "RP_G2_9spots_phantom.dcm").read_bytes())
    (case / "_CASE_READY").write_text("source: plan\n")  # plan mode declared in the ready marker
    manifest = build_manifest(case, config)
    assert manifest["mode"] == "plan"
    out = tmp_path / "p2"
    interpret_case(manifest, config, out)
    assert sorted(p.name for p in (out / "log").iterdir()) == ["1S070", "2S110", "3S150", "4S190", "5S230"]
    values = moqui_csv.read_layer(out / "log" / "1S070" / "01_70.00MeV.csv")
    cal = casegen.ROOMS["G2"]
    np.testing.assert_allclose(np.diff(values[:, 0]), cal.timegain_ms, atol=1e-4)
    assert values[:, 3].sum() * cal.mu_per_dose1_count == pytest.approx(9.0, rel=1e-3)
    spots = {(round(x), round(y)) for x, y in values[:, 1:3]}
    assert spots == {(x, y) for x in (-50, 0, 50) for y in (-50, 0, 50)}
    # At 110 MeV the plan's 9 MU are the counts the monitor counted in the real 2S110 log
    # (303.3 M inside the field; docs/log-plan-frame.md), not 9 MU / 2.12e-8 = 424.5 M.
    counts = moqui_csv.read_layer(out / "log" / "2S110" / "01_110.00MeV.csv")[:, 3].sum()
    assert counts * cal.mu_per_count(110.0) == pytest.approx(9.0, rel=1e-3)
    assert counts == pytest.approx(303.3e6, rel=0.01)


def test_cli_mirrors_mqi_interpreter(tmp_path: Path) -> None:
    case = casegen.write_case(tmp_path / "scan", "c1")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "mqi_communicator.interpret", "--logdir", str(case), "--outputdir", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "8 layer files" in result.stdout
    assert len(list((out / "log").rglob("*.csv"))) == 8


def test_external_interpreter_mode(tmp_path: Path, config: dict) -> None:
    """The external mqi_interpreter is called through its CLI contract, then checked."""
    case = casegen.write_case(tmp_path / "scan", "c1")
    manifest = build_manifest(case, config)
    config["interpreter"]["mode"] = "external"
    config["executables"]["python_interpreter"] = sys.executable
    # Stand-in for the clinic's script: this package's own CLI has the same arguments.
    script = tmp_path / "main_cli.py"
    script.write_text("import sys\nfrom mqi_communicator.interpret import main\nsys.exit(main())\n")
    config["executables"]["mqi_interpreter"] = str(script)
    from mqi_communicator.interpret import run_external

    run_external(manifest, config, tmp_path / "out")
    assert len(list((tmp_path / "out" / "log").rglob("*.csv"))) == 8
    # An external tool that writes nothing fails the check with the missing folder named.
    script.write_text("import sys\nsys.exit(0)\n")
    from mqi_communicator.errors import CaseError

    with pytest.raises(CaseError, match="missing plan copy"):
        run_external(manifest, config, tmp_path / "empty")


def test_ptn_roundtrip_and_size_check(tmp_path: Path) -> None:
    rows = np.arange(80).reshape(10, 8)
    ptn.write_ptn(tmp_path / "a.ptn", rows)
    assert (tmp_path / "a.ptn").read_bytes()[:4] == b"\x00\x00\x00\x01"  # big-endian
    np.testing.assert_array_equal(ptn.read_ptn(tmp_path / "a.ptn"), rows)
    (tmp_path / "b.ptn").write_bytes(b"\x00" * 17)
    with pytest.raises(ValueError, match=r"b\.ptn: size 17 bytes is not a multiple of 16"):
        ptn.read_ptn(tmp_path / "b.ptn")


def test_log_mode_start_up_reads_no_plan_and_validates_settings_once(tmp_path: Path, config: dict) -> None:
    """Start-up is a large share of P2's run (docs/p2-speed.md): in log mode the plan is not read
    with pydicom (the manifest has the beams' names and energies) and scipy is not imported; the
    settings a rule passes for every case are validated once, jsonschema not even imported after."""
    case = casegen.write_case(tmp_path / "scan", "c1")
    manifest = tmp_path / "intake.json"
    manifest.write_text(json.dumps(build_manifest(case, config)))
    settings_json = json.dumps({name: config[name] for name in ("interpreter", "monitor_range_factors", "rooms")})
    probe = (
        "import sys\n"
        "from mqi_communicator.interpret import main\n"
        f"code = main(['--logdir', {str(case)!r}, '--manifest', {str(manifest)!r}, '--outputdir', sys.argv[1],"
        f" '--settings', {settings_json!r}])\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'pydicom', 'scipy', 'jsonschema', 'yaml'}))\n"
        "sys.exit(code)\n"
    )
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    loaded = []
    for run in ("first", "again"):
        result = subprocess.run(
            [sys.executable, "-c", probe, str(tmp_path / run)], capture_output=True, text=True, env=env, check=False
        )
        assert result.returncode == 0, result.stderr
        loaded.append(result.stdout.strip().splitlines()[-1])
    assert loaded == ["['jsonschema', 'yaml']", "[]"]
    for layer in (tmp_path / "first" / "log").rglob("*.csv"):
        assert layer.read_bytes() == (tmp_path / "again" / layer.relative_to(tmp_path / "first")).read_bytes()


def test_a_file_that_cannot_be_written_fails_p2_naming_it(tmp_path: Path, config: dict, capsys) -> None:
    """A layer file that cannot be written fails the step, naming the file, and leaves no half file."""
    case = casegen.write_case(tmp_path / "scan", "c1")
    manifest = tmp_path / "intake.json"
    manifest.write_text(json.dumps(build_manifest(case, config)))
    blocked = tmp_path / "out" / "log" / "2G90" / "03_130.00MeV.csv"
    blocked.mkdir(parents=True)  # a folder where the layer file should go
    args = ["--logdir", str(case), "--manifest", str(manifest), "--outputdir", str(tmp_path / "out")]
    assert main(args) == 1
    error = capsys.readouterr().err
    assert "P2 FAILED for case c1: [Errno 21] Is a directory" in error and f"'{blocked}'" in error
    assert not [p.name for p in blocked.parent.iterdir() if p.name.endswith(".tmp")]  # no half file left


def test_manifest_without_layer_energies_reads_them_from_the_plan(tmp_path: Path, config: dict) -> None:
    """intake.json's contract leaves energies_mev optional: P2 then takes them from the plan."""
    case = casegen.write_case(tmp_path / "scan", "c1")
    manifest = build_manifest(case, config)
    interpret_case(manifest, config, tmp_path / "with")
    for beam in manifest["beams"]:
        del beam["energies_mev"]
    interpret_case(manifest, config, tmp_path / "without")
    written = sorted(p.relative_to(tmp_path / "with") for p in (tmp_path / "with").rglob("*.csv"))
    assert written and written == sorted(
        p.relative_to(tmp_path / "without") for p in (tmp_path / "without").rglob("*.csv")
    )
    assert all((tmp_path / "with" / p).read_bytes() == (tmp_path / "without" / p).read_bytes() for p in written)
