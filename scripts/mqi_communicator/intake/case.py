"""P1 intake: decide a case is ready, validate it, and map each delivery to its plan beam.

The manifest (`intake.json`) is the contract with every later step: the plan, the room, the
treatment beams, and for each delivery folder the beam number it declares in PlanInfo.txt (never
its position among the folders), its layer range, monitor range codes and PTN files (size, sha256).
All problems of a case are collected and reported together, each naming its file.

A case is complete when every treatment beam of its plan has its deliveries; until then it
waits, visibly, up to application.delivery_wait_seconds after its ready marker, then fails
naming the missing beams (`case_readiness`). Plan mode only where configured or declared.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pydicom

from mqi_communicator import cli, settings
from mqi_communicator.errors import CaseError, CaseWaiting
from mqi_communicator.files import sha256_of
from mqi_communicator.formats import beam_geometry, contracts
from mqi_communicator.formats.beam_modifiers import builtin_engine_problems, shifter_labels
from mqi_communicator.formats.plan import Plan, find_plan, read_plan
from mqi_communicator.intake.case_inputs import content_record, is_ready
from mqi_communicator.intake.delivery_folders import Delivery, delivery_header, find_delivery_folders, read_delivery
from mqi_communicator.intake.fractions import case_fractions, fractions_of, in_time_order, log_problems

CASE_ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]+$")
# A case declares plan mode (no delivery logs: a pre-treatment check) with this file, or with a
# line `source: plan` in its ready marker; only then (or with interpreter.source plan) is a case
# without logs computed from the plan, and the result is labelled PLAN-BASED.
PLAN_MODE_MARKER = "_PLAN_MODE"
PLAN_MODE_LINE = re.compile(r"^\s*source\s*[:=]\s*plan\s*$", re.IGNORECASE | re.MULTILINE)
PLAN_BASED_LABEL = "PLAN-BASED"
FLAGGED_LABEL = "FLAGGED"


def plan_mode_declared(case_dir: Path, ready_marker: str) -> bool:
    """The case says it has no logs to wait for: a _PLAN_MODE file or `source: plan` in the marker."""
    if (case_dir / PLAN_MODE_MARKER).exists():
        return True
    try:
        return bool(PLAN_MODE_LINE.search((case_dir / ready_marker).read_text(errors="replace")))
    except OSError:
        return False


def case_source(case_dir: Path, config: dict[str, Any]) -> str:
    """'logs' or 'plan': interpreter.source, or for `auto` the case's own declaration."""
    source = str(config["interpreter"]["source"])
    declared = plan_mode_declared(case_dir, config["application"]["ready_marker"])
    if source == "logs" and declared:
        raise CaseError(
            case_dir,
            f"the case declares plan mode ({PLAN_MODE_MARKER} or 'source: plan') but interpreter.source is 'logs'",
        )
    if source == "auto":
        return "plan" if declared else "logs"
    return source


def plan_mode_refusal(plan: Plan) -> str:
    """Why a plan whose fraction group gives no BeamMeterset (Type 3) cannot be computed alone."""
    beams = ", ".join(f"{b.number} ({b.name!r})" for b in plan.beams_without_mu)
    return (
        f"plan mode needs each treatment beam's MU, but no fraction group gives a BeamMeterset for beam(s) {beams} "
        "(ReferencedBeamSequence, Type 3): run the case with its delivery logs, or export the plan with BeamMeterset"
    )


def _span(first: int, last: int) -> str:
    return str(first) if first == last else f"{first}-{last}"


def missing_deliveries(plan: Plan, deliveries: list[Delivery]) -> list[str]:
    """Each treatment beam whose latest fraction is not complete (layers 1..N), described. A
    delivery resumed inside its interrupted layer completes its fraction (fractions.fractions_of)."""
    missing: list[str] = []
    for beam in plan.treatment_beams:
        mine = in_time_order(d for d in deliveries if d.beam_number == beam.number)
        label = f"beam {beam.number} ({beam.name!r})"
        if not mine:
            missing.append(f"{label}: no delivery")
            continue
        latest = fractions_of(mine, len(beam.layers))[-1]
        first, last, total = latest[0].start_layer, latest[-1].stop_layer, len(beam.layers)
        gaps = ([_span(1, first - 1)] if first > 1 else []) + ([_span(last + 1, total)] if last < total else [])
        if gaps:
            missing.append(f"{label}: layers {', '.join(gaps)} of {total} not delivered")
    return missing


def waiting_state(
    case_dir: Path, config: dict[str, Any], missing: list[str], now: float | None = None
) -> tuple[str, str]:
    """('waiting', reason) until application.delivery_wait_seconds after the ready marker's
    modification time, then ('failed', reason); the reason names the missing beams."""
    app = config["application"]
    wait = float(app["delivery_wait_seconds"])
    marker = case_dir / app["ready_marker"]
    try:
        since = marker.stat().st_mtime
    except OSError:
        since = time.time() if now is None else now
    deadline = since + wait
    current = time.time() if now is None else now
    what = "; ".join(missing)
    if current < deadline:
        until = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(deadline))
        return "waiting", (
            f"waiting for deliveries of {what} (until {until}: application.delivery_wait_seconds {wait:g} s "
            f"after {marker.name})"
        )
    return "failed", (
        f"incomplete: {what}; still missing {wait:g} s (application.delivery_wait_seconds) after {marker.name}. "
        f"If this case has no logs on purpose, declare plan mode ({PLAN_MODE_MARKER})."
    )


def case_readiness(case_dir: Path, config: dict[str, Any], now: float | None = None) -> tuple[str, str]:
    """('ready' | 'waiting' | 'failed', reason) for an unfinished case, cheaply: the ready marker,
    the plan and each delivery's PlanInfo.txt (no PTN is read). A case whose files have a
    problem is 'ready': intake then reports the problem with the file it is in."""
    app = config["application"]
    if not is_ready(case_dir, app["ready_marker"], app["ready_quiet_seconds"], now):
        return (
            "waiting",
            f"not ready: no {app['ready_marker']}, or files changed in the last {app['ready_quiet_seconds']} s",
        )
    try:
        if case_source(case_dir, config) == "plan":
            return "ready", "plan mode"
        plan = read_plan(find_plan(case_dir))
        deliveries = [delivery_header(case_dir, folder, plan) for folder in find_delivery_folders(case_dir)]
    except (CaseError, ValueError, OSError) as exc:
        return "ready", f"intake will report: {exc}"
    missing = missing_deliveries(plan, deliveries)
    return ("ready", "every treatment beam delivered") if not missing else waiting_state(case_dir, config, missing, now)


def modifier_problems(plan: Plan, builtin: bool) -> list[str]:
    """Beam modifiers no engine here computes (docs/beam-modifiers.md): any but a range shifter,
    and for the built-in engine a range shifter without its thickness or position."""
    problems = []
    for beam in plan.treatment_beams:
        found = builtin_engine_problems(beam.modifiers, beam.shifters if builtin else [])
        problems += [f"beam {beam.number} ({beam.name!r}): {p}" for p in found]
    return problems


def plan_geometries(plan: Plan) -> dict[int, beam_geometry.BeamGeometry]:
    """Each treatment beam's geometry as written (docs/plan-geometry.md); a Type 1C value the
    first control point lacks (GantryAngle, PatientSupportAngle) is refused, naming the beams."""
    plan_ds = pydicom.dcmread(plan.path, stop_before_pixels=True)
    try:
        found = {b.number: beam_geometry.read(plan_ds, b.number) for b in plan.treatment_beams}
    except ValueError as exc:
        raise CaseError(plan.path, str(exc)) from exc
    missing = [
        f"{g.label}: {', '.join(g.missing_required())} not given in the first control point"
        for g in found.values()
        if g.missing_required()
    ]
    if missing:
        raise CaseError(
            plan.path,
            "PS3.3 C.8.8.25 requires these (Type 1C) in the first control point of each beam:\n"
            + "\n".join(f"  - {m}" for m in missing),
        )
    return found


def build_manifest(case_dir: Path, config: dict[str, Any], now: float | None = None) -> dict[str, Any]:
    """Validate a case and return its manifest; raises CaseError listing every problem."""
    case_id = case_dir.name
    if not CASE_ID_PATTERN.match(case_id):
        raise CaseError(case_dir, "case folder name must match [A-Za-z0-9._-]+")
    plan_path = find_plan(case_dir)
    plan = read_plan(plan_path)
    mode = case_source(case_dir, config)
    builtin = str(config["executables"]["moqui"]) == "builtin"
    refused = modifier_problems(plan, builtin)
    if refused:
        raise CaseError(plan_path, "beam modifiers that cannot be computed:\n" + "\n".join(f"  - {p}" for p in refused))
    geometries = plan_geometries(plan)
    problems: list[CaseError] = []
    deliveries: list[Delivery] = []
    folders = find_delivery_folders(case_dir)
    warnings = list(plan.warnings) + [s for g in geometries.values() for s in g.statements]
    if plan.beams_without_mu:
        if mode == "plan":
            raise CaseError(plan_path, plan_mode_refusal(plan))
        warnings.append(
            f"no BeamMeterset for beam(s) {[b.number for b in plan.beams_without_mu]}: the MU come from the "
            "delivery logs; the logs' MU cannot be compared with the plan's (docs/plan-support.md)"
        )
    if mode == "plan" and folders:
        warnings.append(f"plan mode: {len(folders)} delivery folder(s) ignored")
    for folder in folders if mode == "logs" else []:
        try:
            deliveries.append(read_delivery(case_dir, folder, plan))
        except CaseError as exc:
            problems.append(exc)
    if problems:
        raise CaseError(case_dir, f"{len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems))
    if mode == "logs":
        missing = missing_deliveries(plan, deliveries)
        if missing:
            state, reason = waiting_state(case_dir, config, missing, now)
            raise (CaseWaiting if state == "waiting" else CaseError)(case_dir, reason)
    fractions = case_fractions(plan, deliveries)
    implausible = [
        p
        for fraction in fractions
        for beam_number, mine in fraction.beams.items()
        for p in log_problems(case_dir, plan, beam_number, mine, config)
    ]
    labels = [PLAN_BASED_LABEL] if mode == "plan" else []
    labels += [label for beam in plan.treatment_beams for label in shifter_labels(beam.shifters, builtin)]
    if implausible:
        if config["log_checks"]["on_failure"] == "fail":
            raise CaseError(
                case_dir,
                f"{len(implausible)} implausible delivery log layer(s) (log_checks):\n"
                + "\n".join(f"  - {p}" for p in implausible),
            )
        labels.append(FLAGGED_LABEL)
        warnings += [f"FLAGGED (log_checks.on_failure flag): {p}" for p in implausible]
    beams = []
    if len(fractions) > 1:
        warnings.append(f"{len(fractions)} fractions delivered; the latest is simulated, each gets its delivery check")
    for beam in plan.treatment_beams:
        beam_fractions = [f.beams[beam.number] for f in fractions if f.beams[beam.number]]
        beams.append(
            {
                "number": beam.number,
                "name": beam.name,
                "sanitized_name": beam.sanitized_name,
                "plan_layers": len(beam.layers),
                "energies_mev": [layer.energy_mev for layer in beam.layers],
                "fractions": [[d.folder for d in fraction] for fraction in beam_fractions],
                "simulated_deliveries": [d.folder for d in beam_fractions[-1]] if beam_fractions else [],
                "simulate": True,
                "range_shifters": [asdict(s) for s in beam.shifters],
                # As written; the beam-frame QA needs none of it (docs/plan-geometry.md).
                "geometry": geometries[beam.number].as_record(),
            }
        )
    return {
        "case_id": case_id,
        "case_dir": str(case_dir.resolve()),
        "mode": mode,
        # Shown with the result wherever it appears (RT Dose, summary, report).
        "labels": labels,
        "flags": implausible,
        "plan": {
            "path": str(plan_path.relative_to(case_dir)),
            "file_name": plan_path.name,
            "sop_instance_uid": plan.sop_instance_uid,
            "patient_id": plan.patient_id,
            "sha256": sha256_of(plan_path),
        },
        "room": plan.room,
        "setup_beams": [b.number for b in plan.beams if b.is_setup],
        "beams": beams,
        "deliveries": [asdict(d) | {"layer_count": d.layer_count} for d in deliveries],
        # The case's fractions (docs/fractions.md): fraction n is each treatment beam's n-th.
        "fractions": [
            {
                "number": f.number,
                "complete": f.complete,
                "beams": {str(b): [d.folder for d in ds] for b, ds in f.beams.items()},
            }
            for f in fractions
        ],
        "warnings": warnings,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mqi_communicator.intake",
        description="Validate a case folder and write its intake manifest (JSON).",
    )
    parser.add_argument("--case", type=Path, required=True, help="the case folder (read only)")
    parser.add_argument("--output", type=Path, required=True, help="manifest to write (intake.json)")
    settings.add_argument(parser)
    # A case still waiting for deliveries (CaseWaiting) says WAITING: the recorder keeps it
    # waiting, not failed, until the deliveries arrive or the wait ends (docs/failures.md).
    return cli.run(parser, _intake, argv, step="intake", label="INTAKE", subject=lambda a: f"case {a.case.name}")


def _intake(args: argparse.Namespace) -> int:
    manifest = build_manifest(args.case, settings.load(args.settings))
    # What the results are made of: later runs compare it to tell a changed case (case_inputs).
    manifest["inputs"] = content_record(args.case)
    for warning in manifest["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    contracts.write("intake", args.output, manifest)
    simulated = [b["name"] for b in manifest["beams"] if b["simulate"]]
    print(f"case {manifest['case_id']}: room {manifest['room']}, mode {manifest['mode']}, beams {simulated}")
    return 0
