"""The sender against Orthanc (an independent archive, started by the test): a destination that is
down is retried by the next runs and alerted after `alert_after_failures` runs; once up, every RT
Dose is stored (Orthanc's REST API gives back the UIDs, the Hangul patient name and the pixel
data sent); a confirmed object is never sent again (docs/dicom-network.md#sender)."""

from __future__ import annotations

import json
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
import yaml

from mqi_communicator import settings
from mqi_communicator.dicomnet import outbox
from tests.alert_servers import webhook  # noqa: F401  (a fixture)
from tests.dciodvfy import in_ci
from tests.dicom_objects import dose_copy, plan_copy
from tests.dicom_peers import free_port, orthanc, orthanc_get, python_module, running_orthanc, wait_for

pytestmark = pytest.mark.skipif(orthanc() is None and not in_ci(), reason="Orthanc not installed (envs/setup.sh --dev)")

HANGUL = "김환자^방사선"
CASE = "20261206_sender"


def site_config(workdir: Path, dicom_port: int, hook_port: int) -> Path:
    site = {
        "alerts": {"webhook": {"url": f"http://127.0.0.1:{hook_port}/hook"}},
        "dicom_network": {
            "sender": {
                "destinations": [{"name": "pacs", "host": "127.0.0.1", "port": dicom_port, "ae_title": "ORTHANC"}],
                "timeout_seconds": 5,
                "alert_after_failures": 2,
            }
        },
    }
    path = workdir / "site.yaml"
    path.write_text(yaml.safe_dump(site, allow_unicode=True))
    return path


def send(workdir: Path, configfile: Path, *which: str):  # type: ignore[no-untyped-def]
    return python_module(
        "mqi_communicator.dicomnet.sender", "--configfile", str(configfile), "--workdir", str(workdir), *which
    )


def test_rt_doses_reach_orthanc_once_with_retries_and_an_alert(tmp_path: Path, webhook) -> None:  # noqa: F811
    doses_dir = tmp_path / "data" / "cases" / CASE / "dicom"
    doses_dir.mkdir(parents=True)
    plan = plan_copy(tmp_path / "plan.dcm", patient_name=HANGUL)
    sent = {}
    for i, name in enumerate(("RD_1.dcm", "RD_2.dcm", "RD_PLAN.dcm")):
        ds = dose_copy(doses_dir / name, plan, frames=3, rows=64, columns=48, seed=i)
        sent[str(ds.SOPInstanceUID)] = doses_dir / name
    dicom_port = free_port()
    configfile = site_config(tmp_path, dicom_port, webhook.server_address[1])
    record = tmp_path / "data" / "cases" / CASE / "intermediate" / "sent" / "pacs.json"

    # The archive is down: nothing confirmed, the case waits in the outbox, the 2nd run alerts once.
    first = send(tmp_path, configfile, "--case", CASE)
    assert first.returncode == 1 and "no association" in first.stderr, first.stderr
    assert outbox.pending(tmp_path) == [CASE]
    assert json.loads(record.read_text())["failed_runs"] == 1 and not webhook.posts
    for _ in range(2):
        again = send(tmp_path, configfile, "--pending")
        assert again.returncode == 1
    assert json.loads(record.read_text())["failed_runs"] == 3
    assert [post["kind"] for _, post in webhook.posts] == ["dicom_send_failed"]  # once, not per run
    assert CASE in webhook.posts[0][1]["subject"] and "pacs" in webhook.posts[0][1]["subject"]

    with running_orthanc(tmp_path / "orthanc") as orthanc:
        assert orthanc["dicom_port"] != dicom_port
        # The archive comes up (on the configured port): the next run stores everything.
        configfile = site_config(tmp_path, int(str(orthanc["dicom_port"])), webhook.server_address[1])
        done = send(tmp_path, configfile, "--pending")
        assert done.returncode == 0, done.stdout + done.stderr
        base = str(orthanc["http"])
        ids = json.loads(orthanc_get(base, "/instances"))
        held = {}
        for instance in ids:
            tags = json.loads(orthanc_get(base, f"/instances/{instance}/simplified-tags"))
            held[tags["SOPInstanceUID"]] = (tags, orthanc_get(base, f"/instances/{instance}/file"))
        assert set(held) == set(sent)
        for uid, (tags, data) in held.items():
            assert tags["PatientName"] == HANGUL
            back = pydicom.dcmread(BytesIO(data))
            assert str(back.PatientName) == HANGUL
            assert (back.pixel_array == pydicom.dcmread(sent[uid]).pixel_array).all()
    state = json.loads(record.read_text())
    assert set(state["confirmed"]) == set(sent) and state["failed_runs"] == 0
    assert outbox.pending(tmp_path) == []
    ledger = json.loads((tmp_path / "data" / "cases" / CASE / "intermediate" / "state" / "alerts.json").read_text())
    assert ledger["sent"] == {}  # the refusal is over

    # Orthanc is gone: a confirmed case is not sent again (no association is even tried).
    repeat = send(tmp_path, configfile, "--case", CASE)
    assert repeat.returncode == 0, repeat.stderr
    assert "confirmed all 3 RT Doses" in repeat.stdout


def test_the_run_recorders_outbox_starts_a_sender_that_empties_it(tmp_path: Path) -> None:
    """What the recorder does when a case finishes and the run ends (ops/recorder.py): add the case
    to the outbox, start the background sender with the run's whole configuration."""
    doses_dir = tmp_path / "data" / "cases" / CASE / "dicom"
    doses_dir.mkdir(parents=True)
    plan = plan_copy(tmp_path / "plan.dcm")
    dose = dose_copy(doses_dir / "RD_1.dcm", plan)
    with running_orthanc(tmp_path / "orthanc") as orthanc:
        configfile = site_config(tmp_path, int(str(orthanc["dicom_port"])), free_port())
        config = settings.load_site(configfile, tmp_path)
        outbox.add(tmp_path, CASE)
        assert outbox.start_sender(config, tmp_path)
        wait_for(lambda: outbox.pending(tmp_path) == [], 60, "the sender to empty the outbox")
        tags = [
            json.loads(orthanc_get(str(orthanc["http"]), f"/instances/{i}/simplified-tags"))
            for i in json.loads(orthanc_get(str(orthanc["http"]), "/instances"))
        ]
    assert [t["SOPInstanceUID"] for t in tags] == [dose.SOPInstanceUID]
    assert "pacs confirmed all 1 RT Doses" in (tmp_path / outbox.SEND_LOG).read_text()
    # Without destinations no sender starts, even with cases waiting.
    config["dicom_network"]["sender"]["destinations"] = []
    outbox.add(tmp_path, CASE)
    assert outbox.start_sender(config, tmp_path) is False
