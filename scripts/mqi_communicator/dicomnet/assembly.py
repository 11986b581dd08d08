"""Case assembly: a case folder in the scan folder from a received plan, its TPS doses and the
delivery folders of the logs inbox (docs/dicom-network.md#case-assembly).

    python -m mqi_communicator.dicomnet.assembly [--configfile SITE.yaml] [--workdir DIR]

(`bin/mqi assemble`; `bin/mqi-run` runs it before every run.) A case is built in a hidden folder
beside the scan folder (`.<scan folder>.assembling/`, the same file system) and renamed into the
scan folder whole, `_CASE_READY` written last: the workflow never sees half a case, and a build
cut by a crash leaves only that hidden folder, rebuilt by the next assembly. Nothing of the inbox
or the staging area is moved or changed: files are copied. A complete delivery arriving for a
case already built (a later fraction) is copied into that case folder, the way the clinic's
sender adds later fractions by hand (docs/fractions.md).

Cost: the staged plans not yet assembled, and the inbox folders not yet placed of patients with a
staged plan, are read; an assembled plan is read again only when such a folder of its patient
arrives. What waits, and why, is written to `dicom_network.assembly.state_file` for `bin/mqi status`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from mqi_communicator import settings
from mqi_communicator.dicomnet import assembly_match as matching
from mqi_communicator.dicomnet.assembly_state import ASSEMBLED, WAITING
from mqi_communicator.dicomnet.staging import patient_folder_name
from mqi_communicator.errors import CaseError
from mqi_communicator.files import fsync_dir, only_one, write_json_atomic
from mqi_communicator.formats.plan import Plan, read_plan
from mqi_communicator.intake.case import CASE_ID_PATTERN, PLAN_MODE_MARKER, missing_deliveries
from mqi_communicator.intake.delivery_folders import Delivery

LOCK = Path(".mqi") / "dicom-assembly.lock"


def case_name(patient_id: str, plan_uid: str) -> str:
    """`<patient>_<last 16 characters of the plan UID>`: the same for the same plan at every run, and
    valid for intake's CASE_ID_PATTERN (the staging folder name of the patient, `~` replaced)."""
    name = f"{patient_folder_name(patient_id).replace('~', '-')}_{plan_uid[-16:].lstrip('.')}"
    assert CASE_ID_PATTERN.match(name), name
    return name


def building_area(scan_dir: Path) -> Path:
    """Where cases are built: beside the scan folder (a rename away), never inside it."""
    return scan_dir.parent / f".{scan_dir.name}.assembling"


def _copy_into(build: Path, sources: list[tuple[Path, str]]) -> None:
    """Copy each (source, name) into `build`: files with their times (copy2), folders whole."""
    for source, name in sources:
        if source.is_dir():
            shutil.copytree(source, build / name, copy_function=shutil.copy2)
        else:
            shutil.copy2(source, build / name)


def place(
    build_area: Path,
    target: Path,
    sources: list[tuple[Path, str]],
    markers: tuple[str, ...] = (),
    build_name: str | None = None,
) -> None:
    """Copy `sources` into a fresh folder of `build_area`, write the empty `markers` last, and
    rename it to `target` (which must not exist)."""
    build = build_area / (build_name or target.name)
    if build.exists():
        shutil.rmtree(build)  # left by a build that was cut (crash, power): started again
    build.mkdir(parents=True)
    _copy_into(build, sources)
    for marker in markers:
        (build / marker).write_text("")
    fsync_dir(build)
    build.rename(target)
    fsync_dir(target.parent)


class Assembler:
    """One assembly pass over the staging area, the logs inbox and the scan folder."""

    def __init__(self, config: dict[str, Any], workdir: Path, now: float | None = None) -> None:
        self.section = config["dicom_network"]["assembly"]
        self.staging = workdir / config["dicom_network"]["receiver"]["staging_directory"]
        self.scan_dir = workdir / config["paths"]["local"]["scan_directory"]
        inbox = str(self.section["logs_inbox"]).strip()
        self.inbox = (workdir / inbox) if inbox else None
        self.quiet_seconds = float(config["application"]["ready_quiet_seconds"])
        self.ready_marker = str(config["application"]["ready_marker"])
        self.plan_mode = self.section["ready_when"] == "plan_and_doses"
        self.state_path = workdir / self.section["state_file"]
        self.now = now
        self.state = self._load_state()
        self._plans: dict[str, Plan] = {}

    def _load_state(self) -> dict[str, Any]:
        try:
            loaded = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            loaded = {}
        return {"plans": loaded.get("plans", {}), "inbox": loaded.get("inbox", {})}

    def _plan(self, path: Path) -> Plan:
        if str(path) not in self._plans:
            self._plans[str(path)] = read_plan(path)
        return self._plans[str(path)]

    def staged_plans(self) -> dict[str, list[Path]]:
        """Staged plan files by the patient's staging folder name."""
        found: dict[str, list[Path]] = {}
        for path in sorted(self.staging.glob("*/plans/*.dcm")):
            found.setdefault(path.parents[1].name, []).append(path)
        return found

    def run(self) -> dict[str, Any]:
        plans = self.staged_plans()
        records = self.state["plans"]
        pending = {
            p.stem for paths in plans.values() for p in paths if records.get(p.stem, {}).get("state") != ASSEMBLED
        }
        by_plan, notes = self._match_inbox(plans, pending)
        for patient, paths in plans.items():
            for path in paths:
                uid = path.stem
                if uid in pending:
                    self._assemble(patient, path, by_plan.get(uid, []), notes.get(uid, []))
                    continue
                records[uid]["notes"] = notes.get(uid, [])  # e.g. a later delivery that is ambiguous
                if by_plan.get(uid) and not records[uid].get("plan_mode"):
                    self._add_later(uid, by_plan[uid])
        self.state["updated"] = time.time() if self.now is None else self.now
        write_json_atomic(self.state_path, self.state)
        return self.state

    def _match_inbox(
        self, plans: dict[str, list[Path]], pending: set[str]
    ) -> tuple[dict[str, list[tuple[Path, Delivery]]], dict[str, list[str]]]:
        """The complete inbox deliveries of each plan, and per plan what was seen but not taken
        (incomplete, still being written, ambiguous)."""
        by_plan: dict[str, list[tuple[Path, Delivery]]] = {}
        notes: dict[str, list[str]] = {}
        if self.inbox is None:
            return by_plan, notes
        cache = self.state["inbox"]
        for folder in matching.inbox_folders(self.inbox):
            known = cache.get(folder.name, {})
            if known.get("placed"):
                continue
            patient = known.get("patient") or matching.patient_of(folder)
            if patient is None:
                continue  # no PlanInfo.txt yet
            cache[folder.name] = {"patient": patient}
            candidates = plans.get(patient_folder_name(patient), [])
            if not candidates:
                continue  # no staged plan of this patient: looked at again when one arrives
            usable = [p for p in candidates if p.stem in pending or not self.state["plans"][p.stem].get("plan_mode")]
            fitting: list[tuple[Path, Delivery]] = []
            misfits = []
            for path in usable:
                try:
                    fitting.append((path, matching.fits(self._plan(path), folder)))
                except (CaseError, ValueError, OSError) as exc:
                    misfits.append(f"plan {path.stem}: {exc}")
            if len(fitting) > 1:
                names = ", ".join(p.stem for p, _ in fitting)
                for path, _ in fitting:
                    notes.setdefault(path.stem, []).append(
                        f"delivery {folder.name} is ambiguous: its patient and beam fit plans {names}; not placed"
                    )
                continue
            if not fitting:
                for path in usable:
                    if path.stem in pending:
                        notes.setdefault(path.stem, []).append(
                            f"delivery {folder.name} of this patient fits no staged plan ({'; '.join(misfits)})"
                        )
                continue
            path, delivery = fitting[0]
            why = matching.incomplete(folder, delivery)
            if why is None and not matching.quiet(folder, self.quiet_seconds, self.now):
                why = f"files changed in the last {self.quiet_seconds:g} s (application.ready_quiet_seconds)"
            if why:
                notes.setdefault(path.stem, []).append(f"delivery {folder.name} (beam {delivery.beam_number}): {why}")
                continue
            by_plan.setdefault(path.stem, []).append((folder, delivery))
        return by_plan, notes

    def _assemble(
        self, patient: str, plan_path: Path, deliveries: list[tuple[Path, Delivery]], notes: list[str]
    ) -> None:
        uid = plan_path.stem
        record = self.state["plans"].setdefault(uid, {"first_seen": time.time() if self.now is None else self.now})
        try:
            plan = self._plan(plan_path)
        except (CaseError, ValueError, OSError) as exc:
            record.update(state=WAITING, reason=f"the staged plan cannot be read: {exc}")
            return
        name = case_name(plan.patient_id, uid)
        doses, missing_doses = matching.tps_doses(self.staging / patient / "doses" / uid, plan)
        delivered = sorted({d.beam_number for _, d in deliveries})
        missing = [] if self.plan_mode else missing_deliveries(plan, [d for _, d in deliveries])
        record.update(
            patient_id=plan.patient_id,
            case=name,
            beams=[b.number for b in plan.treatment_beams],
            beams_delivered=delivered,
            missing_deliveries=missing,
            missing_doses=missing_doses if self.section["wait_for_tps_dose"] else [],
            notes=notes,
        )
        waits = missing + (missing_doses if self.section["wait_for_tps_dose"] else [])
        target = self.scan_dir / name
        if not waits and target.exists():
            waits = [f"a folder {target} exists already (a case dropped by hand?): not overwritten"]
        if waits:
            record.update(state=WAITING, reason="waiting for " + "; ".join(waits))
            return
        sources = [(plan_path, f"RP.{uid}.dcm")] + [(d, f"RD.{d.stem}.dcm") for d in doses]
        if not self.plan_mode:
            sources += [(folder, folder.name) for folder, _ in deliveries]
        markers = ((PLAN_MODE_MARKER,) if self.plan_mode else ()) + (self.ready_marker,)
        try:
            place(building_area(self.scan_dir), target, sources, markers)
        except OSError as exc:
            record.update(state=WAITING, reason=f"building {target} failed: {exc}")
            return
        for folder, _ in [] if self.plan_mode else deliveries:
            self.state["inbox"][folder.name]["placed"] = name
        record.update(
            state=ASSEMBLED,
            plan_mode=self.plan_mode,
            reason="plan mode: plan and TPS doses" if self.plan_mode else "every treatment beam delivered",
            assembled=time.time() if self.now is None else self.now,
            deliveries=[folder.name for folder, _ in deliveries] if not self.plan_mode else [],
        )

    def _add_later(self, uid: str, deliveries: list[tuple[Path, Delivery]]) -> None:
        """Complete deliveries arriving for an assembled case: a later fraction, copied in."""
        record = self.state["plans"][uid]
        case_dir = self.scan_dir / record["case"]
        for folder, _ in deliveries:
            target = case_dir / folder.name
            if not case_dir.is_dir() or target.exists():
                continue
            try:
                sources = [(p, p.name) for p in folder.iterdir()]
                place(building_area(self.scan_dir), target, sources, build_name=f"{record['case']}+{folder.name}")
            except OSError as exc:
                record.setdefault("notes", []).append(f"delivery {folder.name} not added: {exc}")
                continue
            self.state["inbox"][folder.name]["placed"] = record["case"]
            record["deliveries"] = [*record.get("deliveries", []), folder.name]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mqi_communicator.dicomnet.assembly", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--configfile", default=None, help="the site's config (default: config/config.yaml)")
    parser.add_argument("--workdir", type=Path, default=Path.cwd(), help="the project folder (default: here)")
    parser.add_argument("--if-enabled", action="store_true", help="say nothing when disabled (bin/mqi-run)")
    args = parser.parse_args(argv)
    workdir = args.workdir.resolve()
    try:
        config = settings.load_site(args.configfile, workdir)
    except (OSError, ValueError) as exc:
        print(f"mqi assemble: {exc}", file=sys.stderr)
        return 2
    if not config["dicom_network"]["assembly"]["enabled"]:
        if not args.if_enabled:
            print("mqi assemble: case assembly is disabled (dicom_network.assembly.enabled)")
        return 0
    # One assembly at a time: a second one at the same time exits and the next run does the work.
    with only_one(workdir / LOCK) as mine:
        if not mine:
            print("mqi assemble: another assembly is running; nothing to do")
            return 0
        state = Assembler(config, workdir).run()
    for uid, record in sorted(state["plans"].items()):
        print(f"plan {uid} -> {record.get('case', '?')}: {record['state']}: {record.get('reason', '')}")
        for note in record.get("notes", []):
            print(f"  {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
