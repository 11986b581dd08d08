"""The built-in engine (`builtin-tps-env`): contract, physics, and MOQUI's real output.

The reference test runs the engine through its CLI in a subprocess on the clinic's real plan
and compares its spots with MOQUI's own raw plane for the same beam (tests/data/reference).
Other tests call `engine.main` in-process (the same CLI entry point, without the start-up
cost) on plans written here.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from scipy.optimize import OptimizeWarning, curve_fit

from mqi_communicator import files
from mqi_communicator.formats import moqui_csv, plan
from mqi_communicator.formats.moqui_parameters import prepare_beam_logdir, render_parameter_file
from mqi_communicator.formats.raw_dose import PHANTOM_3D, PLANE_2CM, read_raw
from mqi_communicator.simulate import engine
from tests.plan_shapes_modifiers import add_range_shifter

REPO = Path(__file__).resolve().parents[1]
REFERENCE = Path(__file__).resolve().parent / "data" / "reference"  # in the repository: never skipped
needs_reference = pytest.mark.skipif(
    not (REFERENCE / "RP_G2_9spots_phantom.dcm").exists(),
    reason=f"reference data from the real system not found at {REFERENCE}",
)
TEMPLATE = {"GPUID": 0, "UsingPhantomGeo": True, "TwoCentimeterMode": True, "Scorer": "Dose", "OutputFormat": "raw"}


# --- helpers ------------------------------------------------------------------------------


def write_plan(path: Path, beams: list[dict]) -> Path:
    """A small RT Ion Plan: each beam dict has number, name and optionally setup, energies
    (one layer each), spots [(x, y)], machine (modifiers: tests/plan_shapes_modifiers)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(plan.RT_ION_PLAN_SOP_CLASS)
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = plan.RT_ION_PLAN_SOP_CLASS
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "RTPLAN"
    ds.PatientID = "ENGINE^TEST"
    items = []
    for spec in beams:
        beam = Dataset()
        beam.BeamNumber = spec["number"]
        beam.BeamName = spec["name"]
        beam.TreatmentMachineName = spec.get("machine", "G2")
        beam.TreatmentDeliveryType = "SETUP" if spec.get("setup") else "TREATMENT"
        beam.NumberOfRangeShifters = 0
        points = []
        if not spec.get("setup"):
            spots = spec.get("spots", [(0.0, 0.0)])
            for i, energy in enumerate(spec.get("energies", [100.0])):
                for weight in (float(i), float(i + 1)):
                    cp = Dataset()
                    cp.NominalBeamEnergy = energy
                    cp.CumulativeMetersetWeight = weight
                    cp.GantryAngle = 0.0
                    cp.IsocenterPosition = [0.0, 0.0, 0.0]
                    cp.ScanSpotPositionMap = [float(v) for xy in spots for v in xy]
                    cp.ScanSpotMetersetWeights = [1.0 / len(spots) if weight == i else 0.0] * len(spots)
                    points.append(cp)
            beam.FinalCumulativeMetersetWeight = float(len(spec.get("energies", [100.0])))
        beam.IonControlPointSequence = points
        items.append(beam)
    ds.IonBeamSequence = items
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def spot_samples(
    spots: list[tuple[float, float]], weights: list[float], per_spot: int = 40, counts_per_unit: float = 2000.0
) -> np.ndarray:
    """Samples of a delivery that stays on each spot for `per_spot` rows at 0.06 ms."""
    rows = []
    for (x, y), weight in zip(spots, weights, strict=True):
        count = round(weight * counts_per_unit / per_spot)
        rows += [(x, y, count)] * per_spot
    xyc = np.array(rows, dtype=np.float64)
    return np.column_stack([np.arange(len(xyc)) * 0.06, xyc])


def write_layer(folder: Path, index: int, energy: float, samples: np.ndarray, layout: str = "rows") -> Path:
    data = moqui_csv.encode_values(samples[:, 0], samples[:, 1], samples[:, 2], samples[:, 3].astype(np.int64), layout)
    path = folder / moqui_csv.layer_file_name(index, energy)
    files.write_atomic(path, data)
    return path


def write_parameters(path: Path, **per_beam: object) -> Path:
    path.write_text(render_parameter_file(TEMPLATE, per_beam))
    return path


def beam_case(
    tmp_path: Path, name: str, spots: list[tuple[float, float]], energy: float = 100.0, **plan_extra: object
) -> Path:
    """Plan with one beam (number 1), its CSV layer, prepared log folder and parameter file."""
    write_plan(
        tmp_path / "plan" / "RP.dcm", [{"number": 1, "name": name, "energies": [energy], "spots": spots, **plan_extra}]
    )
    csv_dir = tmp_path / "log" / plan.sanitize_beam_name(name)
    write_layer(csv_dir, 1, energy, spot_samples(spots, [1.0] * len(spots)))
    prepare_beam_logdir(csv_dir, 1, tmp_path / "beamlog", "index")
    return write_parameters(
        tmp_path / "beam.in",
        BeamNumbers=1,
        GantryNum=2,
        DicomDir=tmp_path / "plan",
        logFilePath=tmp_path / "beamlog",
        OutputDir=tmp_path / "out",
    )


def run_cli(parameter_file: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environment = os.environ | {"PYTHONPATH": str(REPO / "scripts")} | env
    return subprocess.run(
        [sys.executable, "-m", "mqi_communicator.simulate.engine", str(parameter_file)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=60,
    )


def only_raw(out_dir: Path) -> Path:
    raws = list(out_dir.glob("*_Dose.raw"))
    assert len(raws) == 1, raws
    return raws[0]


def gaussian_fit(
    plane: np.ndarray, centre_mm: tuple[float, float], half_mm: float = 20.0
) -> tuple[float, float, float]:
    """Centre (x, y) and sigma (mm) of a round Gaussian plus offset fitted in a square window."""
    xs, ys = PLANE_2CM.centres("x"), PLANE_2CM.centres("y")
    ix = np.flatnonzero(np.abs(xs - centre_mm[0]) <= half_mm)
    iy = np.flatnonzero(np.abs(ys - centre_mm[1]) <= half_mm)
    window = plane[np.ix_(iy, ix)]
    gx, gy = np.meshgrid(xs[ix], ys[iy])

    def model(xy: tuple[np.ndarray, np.ndarray], a: float, x0: float, y0: float, s: float, c: float) -> np.ndarray:
        return a * np.exp(-((xy[0] - x0) ** 2 + (xy[1] - y0) ** 2) / (2 * s * s)) + c

    start = (window.max(), centre_mm[0], centre_mm[1], 8.0, 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OptimizeWarning)  # exact model data: no covariance needed
        params, _ = curve_fit(model, (gx.ravel(), gy.ravel()), window.ravel(), p0=start)
    return float(params[1]), float(params[2]), abs(float(params[3]))


# --- MOQUI's real output ------------------------------------------------------------------


@needs_reference
def test_spots_and_width_match_moquis_real_plane(tmp_path: Path) -> None:
    """Beam 1S070 of the clinic's QA plan, from the plan's own spots, through the CLI."""
    rt_plan = plan.read_plan(REFERENCE / "RP_G2_9spots_phantom.dcm")
    beam = rt_plan.beam(1)
    assert beam is not None and beam.name == "1S070"
    layer = beam.layers[0]
    csv_dir = tmp_path / "log" / beam.sanitized_name
    write_layer(csv_dir, 1, layer.energy_mev, spot_samples(layer.spot_xy_mm, layer.spot_mu))
    prepare_beam_logdir(csv_dir, beam.number, tmp_path / "beamlog", "index")
    parameters = write_parameters(
        tmp_path / "moqui_tps_1S070.in",
        BeamNumbers=1,
        GantryNum=2,
        DicomDir=REFERENCE,
        logFilePath=tmp_path / "beamlog",
        OutputDir=tmp_path / "out",
    )
    result = run_cli(parameters)
    assert result.returncode == 0, result.stdout + result.stderr
    assert engine.BANNER in result.stdout
    for marker in ("Simlulation finalizing..", "Time taken by MC engine:", "Total execution time:"):
        assert marker in result.stdout
    assert "ERROR" not in result.stdout
    ours = read_raw(str(tmp_path / "out" / "1S070_2_Dose.raw"), PLANE_2CM)[0]
    moqui = read_raw(str(REFERENCE / "1S070_2_Dose.raw"), PLANE_2CM)[0]
    errors, ours_sigma, moqui_sigma = [], [], []
    for spot in layer.spot_xy_mm:
        ox, oy, osig = gaussian_fit(ours, spot)
        mx, my, msig = gaussian_fit(moqui, spot)
        errors.append(np.hypot(ox - mx, oy - my))
        ours_sigma.append(osig)
        moqui_sigma.append(msig)
    print(f"spot position error vs MOQUI (mm): max {max(errors):.3f}, mean {np.mean(errors):.3f}")
    print(f"sigma (mm): engine {np.mean(ours_sigma):.3f}, MOQUI {np.mean(moqui_sigma):.3f}")
    assert len(errors) == 9
    assert max(errors) < 0.5
    assert 8.0 < np.mean(moqui_sigma) < 9.5  # what the README says MOQUI shows (~8.8 mm)
    assert abs(np.mean(ours_sigma) / np.mean(moqui_sigma) - 1) < 0.10


# --- the contract -------------------------------------------------------------------------


def test_index_selection_with_a_setup_beam(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Beams 1 = setup, 2, 3: the prepared folder gives beam 3 its own logs; the naive layout
    (folders for beams 2 and 3 only) gives beam 2 beam 3's logs and beam 3 none."""
    write_plan(
        tmp_path / "plan" / "RP.dcm",
        [
            {"number": 1, "name": "SETUP", "setup": True},
            {"number": 2, "name": "B2", "spots": [(40.0, 0.0)]},
            {"number": 3, "name": "B3", "spots": [(-40.0, 0.0)]},
        ],
    )
    log = tmp_path / "log"
    write_layer(log / "B2", 1, 100.0, spot_samples([(40.0, 0.0)], [1.0]))
    write_layer(log / "B3", 1, 100.0, spot_samples([(-40.0, 0.0)], [1.0]))

    def run(beam: int, log_file_path: Path, out: str) -> tuple[int, str]:
        params = write_parameters(
            tmp_path / f"{out}.in",
            BeamNumbers=beam,
            GantryNum=2,
            DicomDir=tmp_path / "plan",
            logFilePath=log_file_path,
            OutputDir=tmp_path / out,
        )
        code = engine.main([str(params)])
        return code, capsys.readouterr().out

    def peak_x(out: str) -> float:
        plane = read_raw(str(only_raw(tmp_path / out)), PLANE_2CM)[0]
        return float(gaussian_fit(plane, (plane.sum(axis=0).argmax() - 199.5, 0.0))[0])

    prepare_beam_logdir(log / "B3", 3, tmp_path / "beam3_log", "index")
    code, out = run(3, tmp_path / "beam3_log", "prepared3")
    assert code == 0, out
    assert "beam3_log/B3 (selected by index)" in out
    assert abs(peak_x("prepared3") + 40.0) < 0.1
    assert only_raw(tmp_path / "prepared3").name == "B3_2_Dose.raw"

    code, out = run(2, log, "naive2")  # succeeds, silently with the wrong beam's logs
    assert code == 0 and "log/B3 (selected by index)" in out
    assert abs(peak_x("naive2") + 40.0) < 0.1  # beam 2's spot is at +40: wrong folder
    code, out = run(3, log, "naive3")
    assert code == 1
    assert "ERROR: logFilePath" in out and "selects sorted entry index 2, but the folder has 2 entries" in out

    code, out = run(1, log, "setup")
    assert code == 1 and "ERROR: BeamNumbers 1: beam 'SETUP'" in out and "setup beam" in out


def test_output_name_keeps_colon_and_follows_range_shifters(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    params = beam_case(tmp_path / "a", "1G180:TX", [(0.0, 0.0)])
    assert engine.main([str(params)]) == 0
    raw = only_raw(tmp_path / "a" / "out")
    assert raw.name == "1G180:TX_2_Dose.raw"
    assert raw.stat().st_size == PLANE_2CM.n_bytes == 1_280_000
    assert list((tmp_path / "a" / "out").iterdir()) == [raw]  # no temporary left behind
    params = beam_case(tmp_path / "b", "2G90:RS", [(0.0, 0.0)])
    add_range_shifter(tmp_path / "b" / "plan" / "RP.dcm", 1, shifter_id="RS30", wet_mm=30.0)
    assert engine.main([str(params)]) == 0
    assert only_raw(tmp_path / "b" / "out").name == "2G90:RS_3_Dose.raw"
    assert "Range shifter: range shifter RS30 (BINARY): WET 30 mm" in capsys.readouterr().out


def test_single_line_layout_gives_the_same_dose_as_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Values exact in both layouts (quarter millimetres), so both parse to the same numbers.
    samples = spot_samples([(12.25, -7.5), (-30.0, 22.75)], [1.0, 0.5])
    doses = []
    for layout in ("rows", "single_line"):
        root = tmp_path / layout
        write_plan(root / "plan" / "RP.dcm", [{"number": 1, "name": "B1", "energies": [120.0, 90.0]}])
        write_layer(root / "log" / "B1", 1, 120.0, samples, layout)
        write_layer(root / "log" / "B1", 2, 90.0, samples[::2], layout)
        prepare_beam_logdir(root / "log" / "B1", 1, root / "beamlog", "index")
        params = write_parameters(
            root / "b.in",
            BeamNumbers=1,
            GantryNum=1,
            DicomDir=root / "plan",
            logFilePath=root / "beamlog",
            OutputDir=root / "out",
        )
        assert engine.main([str(params)]) == 0, capsys.readouterr().out
        doses.append((root / "out" / "B1_2_Dose.raw").read_bytes())
    assert b"\r\n" in (tmp_path / "rows" / "log" / "B1" / "01_120.00MeV.csv").read_bytes()
    assert (tmp_path / "single_line" / "log" / "B1" / "01_120.00MeV.csv").read_bytes().count(b"\n") == 1
    assert doses[0] == doses[1]


def test_asymmetric_spots_land_at_x_column_y_row(tmp_path: Path) -> None:
    """(x, y) = (+60, 0) and (0, +30): x runs along columns (fastest), y along rows."""
    params = beam_case(tmp_path, "ASYM", [(60.0, 0.0), (0.0, 30.0)])
    assert engine.main([str(params)]) == 0
    plane = read_raw(str(tmp_path / "out" / "ASYM_2_Dose.raw"), PLANE_2CM)[0]
    # Pixel centres are at -199.5 + i mm: x = 60 lies between columns 259 and 260.
    right = plane[190:210, 240:280]
    up = plane[210:250, 180:220]
    assert np.unravel_index(right.argmax(), right.shape)[1] + 240 in (259, 260)
    assert np.unravel_index(right.argmax(), right.shape)[0] + 190 in (199, 200)
    assert np.unravel_index(up.argmax(), up.shape)[0] + 210 in (229, 230)
    assert np.unravel_index(up.argmax(), up.shape)[1] + 180 in (199, 200)
    x, y, _ = gaussian_fit(plane, (60.0, 0.0))
    assert abs(x - 60.0) < 0.05 and abs(y) < 0.05
    x, y, _ = gaussian_fit(plane, (0.0, 30.0))
    assert abs(x) < 0.05 and abs(y - 30.0) < 0.05
    # Nothing at the mirrored positions.
    assert plane[199:201, 139:141].max() < 1e-3 * plane.max()
    assert plane[169:171, 199:201].max() < 1e-3 * plane.max()


def test_three_d_phantom_has_a_bragg_peak_at_the_range(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    params = beam_case(tmp_path, "D3", [(20.0, -10.0)], energy=120.0)
    text = params.read_text().replace("TwoCentimeterMode true", "TwoCentimeterMode false")
    params.write_text(text)
    assert engine.main([str(params)]) == 0, capsys.readouterr().out
    dose = read_raw(str(tmp_path / "out" / "D3_2_Dose.raw"), PHANTOM_3D)
    depth = PHANTOM_3D.centres("z")
    curve = dose.sum(axis=(1, 2))
    r0_mm = engine.range_cm(120.0) * 10
    peak = depth[curve.argmax()]
    assert r0_mm - 6 < peak <= r0_mm + 1
    assert 2.5 < curve.max() / curve[0] < 5.0  # peak-to-entrance ratio of a pristine peak
    assert curve[depth > r0_mm + 10].max() < 1e-3 * curve.max()
    shallow = dose[5]
    x_centroid = (shallow.sum(axis=0) * PHANTOM_3D.centres("x")).sum() / shallow.sum()
    y_centroid = (shallow.sum(axis=1) * PHANTOM_3D.centres("y")).sum() / shallow.sum()
    assert abs(x_centroid - 20.0) < 0.05 and abs(y_centroid + 10.0) < 0.05

    # Lateral spread grows with depth (multiple scattering).
    def width(k: int) -> float:
        profile = dose[k].sum(axis=0)
        x = PHANTOM_3D.centres("x")
        mean = (profile * x).sum() / profile.sum()
        return float(np.sqrt((profile * (x - mean) ** 2).sum() / profile.sum()))

    assert width(int(curve.argmax())) > width(2) * 1.02


def test_dose_scale_factor_and_room_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    params = beam_case(tmp_path, "S", [(0.0, 0.0)], energy=70.0)
    assert engine.main([str(params)]) == 0
    base = read_raw(str(tmp_path / "out" / "S_2_Dose.raw"), PLANE_2CM)[0]
    assert "RELATIVE" in capsys.readouterr().out
    params.write_text(params.read_text() + "DoseScaleFactor 2.5\n")
    assert engine.main([str(params)]) == 0
    np.testing.assert_allclose(read_raw(str(tmp_path / "out" / "S_2_Dose.raw"), PLANE_2CM)[0], 2.5 * base, rtol=1e-12)
    params.write_text(params.read_text().replace("GantryNum 2", "GantryNum 1"))
    assert engine.main([str(params)]) == 0
    assert "WARNING: GantryNum 1 but the plan's room is G2" in capsys.readouterr().out
    g1 = read_raw(str(tmp_path / "out" / "S_2_Dose.raw"), PLANE_2CM)[0]
    assert abs(gaussian_fit(g1, (0.0, 0.0), 30.0)[2] - 10.70) < 0.15  # G1's in-air sigma at 70 MeV
    assert abs(gaussian_fit(base, (0.0, 0.0))[2] - 8.62) < 0.15  # G2's


# --- failures -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t, root: t.replace("GantryNum 2\n", ""), "missing required key GantryNum"),
        (lambda t, root: t.replace("GantryNum 2", "GantryNum 3"), "GantryNum must be 1 or 2"),
        (lambda t, root: t.replace("BeamNumbers 1", "BeamNumbers 7"), "BeamNumbers 7: no such beam in plan"),
        (lambda t, root: t.replace(str(root / "plan"), str(root / "log")), "no RT Ion Plan"),
        (lambda t, root: t.replace(str(root / "beamlog"), str(root / "empty")), "selects sorted entry index 0"),
        (lambda t, root: t.replace("Scorer Dose", "Scorer LETd"), "Scorer LETd is not supported"),
    ],
)
def test_failures_print_an_error_line_and_exit_non_zero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], change: Callable[[str, Path], str], message: str
) -> None:
    params = beam_case(tmp_path, "F", [(0.0, 0.0)])
    (tmp_path / "empty").mkdir()
    params.write_text(change(params.read_text(), tmp_path))
    assert engine.main([str(params)]) == 1
    out = capsys.readouterr().out
    error_lines = [line for line in out.splitlines() if line.startswith("ERROR: ")]
    assert len(error_lines) == 1 and message in error_lines[0], out
    assert "Simlulation finalizing.." not in out
    assert not (tmp_path / "out").exists()


def test_bad_csv_is_an_error_naming_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    params = beam_case(tmp_path, "C", [(0.0, 0.0)])
    bad = tmp_path / "beamlog" / "C" / "02_90.00MeV.csv"
    bad.write_bytes(b"0.0,1.0,2.0,3\r\n0.06,abc,2.0,3\r\n")
    assert engine.main([str(params)]) == 1
    assert f"ERROR: bad CSV {bad}" in capsys.readouterr().out
    bad.write_bytes(b"0.0,1.0,2.0\r\n")
    assert engine.main([str(params)]) == 1
    assert "not a multiple of 4" in capsys.readouterr().out
    bad.unlink()
    (tmp_path / "beamlog" / "C" / "layer_one.csv").write_bytes(b"0.0,1.0,2.0,3\r\n")
    assert engine.main([str(params)]) == 1
    assert "not a MOQUI layer file name" in capsys.readouterr().out


def test_cli_exit_codes(tmp_path: Path) -> None:
    missing = run_cli(tmp_path / "nope.in")
    assert missing.returncode == 1 and f"ERROR: cannot read parameter file {tmp_path / 'nope.in'}" in missing.stdout
    usage = subprocess.run(
        [sys.executable, "-m", "mqi_communicator.simulate.engine"],
        capture_output=True,
        text=True,
        env=os.environ | {"PYTHONPATH": str(REPO / "scripts")},
    )
    assert usage.returncode == 2 and "ERROR: usage" in usage.stdout


# --- physics and the fast CSV reader ------------------------------------------------------


def test_physics_building_blocks() -> None:
    assert engine.sigma_in_air_mm(70.0, 2) == pytest.approx(8.62)
    assert engine.sigma_in_air_mm(50.0, 2) == pytest.approx(8.62)  # clamped
    assert engine.sigma_in_air_mm(250.0, 1) == pytest.approx(3.58)
    assert engine.sigma_in_air_mm(85.0, 1) == pytest.approx((10.70 + 7.88) / 2)
    assert engine.range_cm(100.0) == pytest.approx(0.0022 * 100**1.77)
    # Protons per MU ~ 1 / stopping power: more protons per count at higher energy.
    assert engine.protons_per_count(100.0) == pytest.approx(1.0)
    assert engine.protons_per_count(200.0) == pytest.approx(2 ** (1.77 - 1))
    for energy in (70.0, 150.0, 230.0):
        r0 = engine.range_cm(energy)
        z = np.linspace(0, r0 * 1.2, 2401)
        dd = engine.bortfeld_dose(z, energy)
        assert np.isfinite(dd).all() and (dd >= 0).all()
        assert r0 * 0.97 < z[dd.argmax()] < r0
        assert np.max(np.abs(np.diff(dd[z < r0 * 0.9]))) < 0.01 * dd.max()  # smooth plateau (no seam)
        assert engine.mcs_sigma_mm(energy, np.array([20.0]))[0] < 0.5
        assert 0.018 < engine.mcs_sigma_mm(energy, np.array([r0 * 10]))[0] / (r0 * 10) < 0.03


def test_fast_reader_is_bit_identical_to_read_layer(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    n = 20000
    x = rng.normal(0, 80, n)
    x[:5] = [0.0, -0.0, 1.2e-5, -3.4e-7, 123456.0]
    samples = np.column_stack([np.arange(n) * 0.06, x, rng.uniform(-300, 300, n), rng.integers(0, 5000, n)])
    for layout in ("rows", "single_line"):
        path = write_layer(tmp_path / layout, 1, 100.0, samples, layout)
        fast, plain = moqui_csv.read_layer_fast(path), moqui_csv.read_layer(path)
        assert fast.shape == (n, 4)
        assert np.array_equal(fast.view(np.uint64), plain.view(np.uint64))
        # In chunks too (the boundary falls after a separator somewhere mid-file).
        chunked = moqui_csv.parse_values(path.read_bytes(), chunk_bytes=4096)
        assert chunked is not None and np.array_equal(chunked.view(np.uint64), plain.ravel().view(np.uint64))
    if (REFERENCE / "legacy_single_line_2S110_01_110MeV.csv").exists():
        legacy = REFERENCE / "legacy_single_line_2S110_01_110MeV.csv"
        fast, plain = moqui_csv.read_layer_fast(legacy), moqui_csv.read_layer(legacy)
        assert fast.shape == (54905, 4) and np.array_equal(fast.view(np.uint64), plain.view(np.uint64))
    odd = tmp_path / "odd.csv"
    for data in (b"", b"\r\n", b"1,2,3,4\r\n\r\n", b" 1,2,3,4", b"1e3,-.5,5.,+2\n", b"12345678901234567890,1,2,3"):
        odd.write_bytes(data)
        assert np.array_equal(moqui_csv.read_layer_fast(odd), moqui_csv.read_layer(odd)), data
    for data in (b"1,2,,3", b"1,2,3\r4", b"1,2-3,4,5", b"1.2.3,4,5,6", b"1,2,3", b"1,-,2,3", b"1,.,2,3", b"-.,1,2,3"):
        odd.write_bytes(data)
        with pytest.raises(ValueError) as plain_error:
            moqui_csv.read_layer(odd)
        with pytest.raises(ValueError) as fast_error:
            moqui_csv.read_layer_fast(odd)
        assert str(fast_error.value) == str(plain_error.value)
