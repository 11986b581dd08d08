"""The built-in engine: a `tps_env`-compatible analytical pencil-beam dose calculation.

Usage: `builtin-tps-env <input.in>` or `python -m mqi_communicator.simulate.engine <input.in>`, exactly
as MOQUI's `tps_env` is called (docs/design.md#moqui-engine-contract): the same parameter file, the same CSV folder
(selected as the SMC fork selects it unless `LogFileSelection name`), the same raw output
`<OutputDir>/<BeamName>_<k>_Dose.raw` (float64 LE, x fastest) and the same log markers.
It is NOT Monte Carlo and says so in its first log line.

Physics (water phantom, MOQUI's beam frame, parallel beam — divergence is ignored):
- Depth dose: Bortfeld's analytical Bragg curve (Med. Phys. 24 (1997) 2024) with the
  Bragg-Kleeman range R0 = alpha * E^p (alpha = 0.0022 cm/MeV^p, p = 1.77), nuclear
  attenuation beta = 0.012 /cm, gamma = 0.6, low-energy fluence fraction epsilon = 0.1,
  1 % energy spread; the parabolic-cylinder form near the peak, its asymptote far before it.
- Protons per count scale like 1 / S(E) with the Bragg-Kleeman stopping power
  S(E) = E^(1-p) / (alpha p) (a monitor chamber measures charge ~ protons x S), normalized to
  one proton per count at 100 MeV, so layers of different energies weigh physically.
- Lateral: each sample (CSV row) is a Gaussian beamlet at (x, y) weighted by its count, with
  sigma^2 = sigma_air(E)^2 + sigma_MCS(E, depth)^2: the room's in-air sigma at the isocentre
  (`pencil_physics.SIGMA_AIR_MM`, tables for G1/G2 from the clinic's MOQUI beam
  models, linear in energy, clamped outside) and multiple Coulomb
  scattering from the Highland formula integrated over depth with the Bragg-Kleeman energy.
  Samples are deposited on the grid by linear (cloud-in-cell) weighting, then smoothed with
  scipy.ndimage.gaussian_filter; the filter's sigma is reduced by 1/12 px^2 so that,
  averaged over sub-pixel positions, the result matches the dose averaged over a pixel.
- Units: Gy for one proton per count at 100 MeV, i.e. RELATIVE dose, times the optional
  parameter `DoseScaleFactor`.
- Range shifters (docs/beam-modifiers.md): the plan's RangeShifterWaterEquivalentThickness
  pulls the depth dose back (the pristine curve from the WET on) and leaves the residual
  Bragg-Kleeman energy to scatter in the water; each shifter's own Highland scattering,
  times the drift from its downstream face (IsocenterToRangeShifterDistance), adds in
  quadrature. A shifter without those values, and any other beam modifier, is refused.

Parameter handling: paths are used as written (relative ones against the working directory,
where MOQUI is started); `ParentDir`, `OverwriteResults` (the raw is always replaced
atomically), `RandomSeed` and the history keys are accepted and ignored; `GPUID` is only
logged. `UsingPhantomGeo false` (patient CT) and any `Scorer` other than Dose are refused.
"""

from __future__ import annotations

import math
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

from mqi_communicator import __version__
from mqi_communicator.errors import CaseError, InputError, MqiError
from mqi_communicator.files import write_atomic
from mqi_communicator.formats.beam_modifiers import builtin_engine_problems, shifters_in_beam
from mqi_communicator.formats.moqui_csv import energy_of_file_name, read_layer_fast
from mqi_communicator.formats.moqui_parameters import (
    Parameters,
    parse_parameter_file,
    select_beam_logdir,
    validate_parameters,
)
from mqi_communicator.formats.plan import find_plan, read_plan
from mqi_communicator.formats.raw_dose import PHANTOM_3D, PLANE_2CM, PLANE_DEPTH_MM, Grid, output_index
from mqi_communicator.simulate.pencil_physics import (
    GY_PER_MEV_PER_G,
    Shifter,
    bortfeld_dose,
    lateral_sigma_mm,
    mcs_sigma_mm,
    protons_per_count,
    range_cm,
    sigma_in_air_mm,
)

# Re-exported: the engine's physics, as tests and benchmarks read it (pencil_physics).
__all__ = [
    "Layer",
    "bortfeld_dose",
    "compute_dose",
    "lateral_sigma_mm",
    "main",
    "mcs_sigma_mm",
    "protons_per_count",
    "range_cm",
    "sigma_in_air_mm",
]

BANNER = "Built-in analytical pencil-beam engine (not Monte Carlo)"
FINAL_MARKER = "Simlulation finalizing.."  # sic, MOQUI's spelling

TRUNCATE = 4.0  # gaussian_filter's kernel radius in sigmas
SIGMA_STEP = 1.005  # 3-D: depths whose filter sigma agree within 0.5 % share one convolution


class EngineError(MqiError):
    """A problem the engine reports as `ERROR: <message>` before exiting non-zero."""


# --- dose on the grid ---------------------------------------------------------------------


@dataclass
class Layer:
    energy_mev: float
    samples: np.ndarray  # (N, 4): time_ms, x_mm, y_mm, count


def _filter_sigma_px(sigma_mm: float, spacing_mm: float) -> float:
    return math.sqrt(max((sigma_mm / spacing_mm) ** 2 - 1.0 / 12.0, 1e-6))


def _deposit(samples: np.ndarray, weight: float, grid: Grid, pad: int) -> np.ndarray:
    """Cloud-in-cell histogram of the samples' counts on the grid widened by `pad` pixels;
    samples whose 2x2 neighbourhood leaves the widened grid are dropped."""
    nxp, nyp = grid.nx + 2 * pad, grid.ny + 2 * pad
    fx = (samples[:, 1] - grid.first_centre_mm[0]) / grid.spacing_mm[0] + pad
    fy = (samples[:, 2] - grid.first_centre_mm[1]) / grid.spacing_mm[1] + pad
    counts = samples[:, 3]
    keep = (counts != 0) & (fx >= 0) & (fx < nxp - 1) & (fy >= 0) & (fy < nyp - 1)
    fx, fy, w = fx[keep], fy[keep], counts[keep] * weight
    ix = fx.astype(np.intp)
    iy = fy.astype(np.intp)
    tx = fx - ix
    ty = fy - iy
    index = iy * nxp + ix
    size = nxp * nyp
    wy0 = w * (1 - ty)
    wy1 = w * ty
    hist = np.bincount(index, wy0 * (1 - tx), size)
    hist += np.bincount(index + 1, wy0 * tx, size)
    hist += np.bincount(index + nxp, wy1 * (1 - tx), size)
    hist += np.bincount(index + nxp + 1, wy1 * tx, size)
    return hist.reshape(nyp, nxp)


def _support(hist: np.ndarray, margin: int) -> tuple[slice, slice] | None:
    rows = np.flatnonzero(hist.any(axis=1))
    cols = np.flatnonzero(hist.any(axis=0))
    if rows.size == 0:
        return None
    return (
        slice(max(rows[0] - margin, 0), min(rows[-1] + margin + 1, hist.shape[0])),
        slice(max(cols[0] - margin, 0), min(cols[-1] + margin + 1, hist.shape[1])),
    )


def compute_dose(
    layers: list[Layer], gantry: int, grid: Grid, depths_mm: np.ndarray, shifters: Sequence[Shifter] = ()
) -> np.ndarray:
    """Dose (relative Gy, see module docstring) on `grid`, shape (len(depths_mm), ny, nx).
    `shifters`: the range shifters in the beam, (WET mm, isocentre distance mm) each."""
    if grid.spacing_mm[0] != grid.spacing_mm[1]:
        raise InputError("the engine needs square pixels")
    spacing = grid.spacing_mm[0]
    pixel_area_cm2 = spacing * spacing / 100.0
    wet_mm = sum(wet for wet, _ in shifters)
    plans = []
    for layer in layers:
        # Behind a shifter the phantom sees the pristine curve from the shifter's WET on: the
        # range is pulled back by the WET, straggling and nuclear losses in it included.
        depth_dose = bortfeld_dose((depths_mm + wet_mm) / 10.0, layer.energy_mev) * GY_PER_MEV_PER_G
        active = np.flatnonzero(depth_dose > max(depth_dose.max(), 1e-300) * 1e-9)
        sigmas = lateral_sigma_mm(layer.energy_mev, depths_mm[active], gantry, shifters)
        plans.append((layer, depth_dose, active, sigmas))
    sigma_max = max((float(s.max()) for *_, s in plans if s.size), default=1.0)
    pad = math.ceil(TRUNCATE * sigma_max / spacing) + 2
    dose = np.zeros((len(depths_mm), grid.ny + 2 * pad, grid.nx + 2 * pad))
    for layer, depth_dose, active, sigmas in plans:
        fluence = _deposit(layer.samples, protons_per_count(layer.energy_mev) / pixel_area_cm2, grid, pad)
        window = _support(fluence, math.ceil(TRUNCATE * float(sigmas.max(initial=0.0)) / spacing) + 2)
        if window is None or active.size == 0:
            continue
        region = fluence[window]
        cache: dict[int, np.ndarray] = {}
        for k, sigma_mm in zip(active, sigmas, strict=True):
            sigma_px = _filter_sigma_px(float(sigma_mm), spacing)
            key = round(math.log(sigma_px) / math.log(SIGMA_STEP)) if len(depths_mm) > 1 else 0
            if key not in cache:
                quantized = SIGMA_STEP**key if len(depths_mm) > 1 else sigma_px
                cache[key] = gaussian_filter(region, quantized, mode="constant", truncate=TRUNCATE)
            dose[k][window] += depth_dose[k] * cache[key]
    return dose[:, pad : pad + grid.ny, pad : pad + grid.nx]


# --- the tps_env program ------------------------------------------------------------------


def _log(line: str) -> None:
    print(line, flush=True)


def _bool(params: Parameters, key: str, default: bool) -> bool:
    return params[key] == "true" if key in params else default


def _read_layers(folder: Path) -> list[Layer]:
    files = sorted(p for p in folder.iterdir() if p.suffix == ".csv" and p.is_file())
    if not files:
        raise EngineError(f"no *.csv layer files in {folder}")
    layers = []
    for path in files:
        try:
            energy = energy_of_file_name(path.name)
            samples = read_layer_fast(path)
        except (ValueError, OSError) as exc:
            raise EngineError(f"bad CSV {path}: {exc}") from exc
        if energy <= 0 or not math.isfinite(energy):
            raise EngineError(f"bad CSV {path}: energy {energy} MeV from the file name")
        if not np.isfinite(samples).all():
            raise EngineError(f"bad CSV {path}: non-finite values")
        layers.append(Layer(energy, samples))
    return layers


def run(parameter_file: Path, started: float) -> Path:
    """Compute one beam's dose as the parameter file asks; returns the raw file written."""
    try:
        params = parse_parameter_file(parameter_file)
        validate_parameters(params, str(parameter_file))
    except OSError as exc:
        raise EngineError(f"cannot read parameter file {parameter_file}: {exc.strerror}") from exc
    except ValueError as exc:
        raise EngineError(str(exc)) from exc
    for key, supported in (("UsingPhantomGeo", "true"), ("Scorer", "Dose")):
        if key in params and params[key].lower() != supported.lower():
            raise EngineError(f"{parameter_file}: {key} {params[key]} is not supported by the built-in engine")
    _log(f"GPUID {params['GPUID']} (ignored: the built-in engine runs on the CPU)")
    beam_number = int(params["BeamNumbers"])
    gantry = int(params["GantryNum"])
    dicom = Path(params.get("DicomDir") or params["DicomPath"])
    try:
        plan_path = find_plan(dicom) if dicom.is_dir() else dicom
        if not plan_path.is_file():
            raise CaseError(plan_path, "no RT Ion Plan (DicomDir/DicomPath does not exist)")
        plan = read_plan(plan_path)
    except CaseError as exc:
        raise EngineError(f"DicomDir: {exc}") from exc
    beam = plan.beam(beam_number)
    if beam is None:
        beams = ", ".join(f"{b.number} {b.name}" for b in plan.beams)
        raise EngineError(f"BeamNumbers {beam_number}: no such beam in plan {plan_path} (beams: {beams})")
    if beam.is_setup:
        raise EngineError(f"BeamNumbers {beam_number}: beam {beam.name!r} in {plan_path} is a setup beam")
    if "/" in beam.name or "\0" in beam.name:
        raise EngineError(f"beam name {beam.name!r} cannot name an output file")
    _log(f"Plan: {plan_path}")
    _log(f"Beam: {beam.number} {beam.name!r}, {len(beam.layers)} layers in the plan, room {plan.room}")
    if plan.room != f"G{gantry}":
        _log(f"WARNING: GantryNum {gantry} but the plan's room is {plan.room}; using the G{gantry} beam model")
    refused = builtin_engine_problems(beam.modifiers, beam.shifters)
    if refused:
        raise EngineError(f"{plan_path}: beam {beam.number} {beam.name!r}: " + "; ".join(refused))
    for shifter in beam.shifters:
        _log(f"Range shifter: {shifter.summary()}")
    shifters = shifters_in_beam(beam.shifters)
    selection = params.get("LogFileSelection", "index")
    try:
        folder = select_beam_logdir(Path(params["logFilePath"]), beam_number, beam.name, selection)
    except ValueError as exc:
        raise EngineError(str(exc)) from exc
    _log(f"Log folder: {folder} (selected by {selection})")
    two_cm = _bool(params, "TwoCentimeterMode", False)
    grid = PLANE_2CM if two_cm else PHANTOM_3D
    depths = np.array([PLANE_DEPTH_MM]) if two_cm else grid.centres("z")
    if two_cm:
        _log(f"Geometry: TwoCentimeterMode, {grid.nx} x {grid.ny} plane of 1 mm at {PLANE_DEPTH_MM:g} mm depth")
    else:
        _log(f"Geometry: water phantom {grid.nx} x {grid.ny} x {grid.nz}, {grid.spacing_mm[0]:g} mm voxels")
    scale = float(params.get("DoseScaleFactor", "1"))
    _log(
        f"Dose scale: {scale:g}"
        + (" (DoseScaleFactor)" if "DoseScaleFactor" in params else " (RELATIVE dose: no DoseScaleFactor given)")
    )
    layers = _read_layers(folder)
    total = sum(float(layer.samples[:, 3].sum()) for layer in layers)
    _log(f"Layers: {len(layers)}, samples: {sum(len(layer.samples) for layer in layers)}, counts: {total:g}")
    engine_start = time.perf_counter()
    dose = compute_dose(layers, gantry, grid, depths, shifters) * scale
    engine_time = time.perf_counter() - engine_start
    out_dir = Path(params["OutputDir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{beam.name}_{output_index(beam.range_shifters)}_Dose.raw"
    write_atomic(out, np.ascontiguousarray(dose, dtype="<f8").tobytes())
    _log(f"Dose written: {out} (max {dose.max():.6g})")
    _log(FINAL_MARKER)
    _log(f"Time taken by MC engine: {engine_time:.3f}")
    _log(f"Total execution time: {time.perf_counter() - started:.3f}")
    return out


HELP = """usage: python -m mqi_communicator.simulate.engine INPUT.in      (or: builtin-tps-env INPUT.in)

The built-in engine, called exactly as MOQUI's tps_env: reads the MOQUI parameter file INPUT.in
and its CSV folder, writes <OutputDir>/<BeamName>_<k>_Dose.raw (float64, x fastest) and logs to
stdout. An analytical pencil-beam approximation, NOT Monte Carlo: its doses are RELATIVE.
Exit status: 0 done, 1 error (the log says which), 2 usage."""


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-h", "--help"):
        print(HELP)
        return 0
    _log(f"{BANNER}, mqi_communicator {__version__}")
    if len(args) != 1 or args[0].startswith("-"):
        _log("ERROR: usage: builtin-tps-env <input.in> (one MOQUI parameter file)")
        return 2
    _log(f"Parameter file: {args[0]}")
    try:
        run(Path(args[0]), started)
    except EngineError as exc:
        _log(f"ERROR: {exc}")
        return 1
    except Exception as exc:  # the log must carry a failure marker whatever went wrong
        traceback.print_exc()
        _log(f"ERROR: internal error in the built-in engine: {type(exc).__name__}: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
