"""The DICOM Storage SCP: RT Ion Plans, RT Doses, RT Structure Sets and CT images from the TPS or
the OIS, each written durably into the staging folder (staging.py) before it is acknowledged.

Only the calling AE titles of `dicom_network.receiver.allowed_calling_ae_titles` may associate. An
object is answered Success only once it is on disk; a refused write (disk full, read-only, no
permission) answers 0xA700 (Out of Resources) so that the sender keeps it and retries; an object
that cannot be read answers 0xC000 (Cannot Understand). Either way the association goes on and
the other objects are stored (docs/dicom-network.md).

    python -m mqi_communicator.dicomnet.receiver [--configfile SITE.yaml] [--workdir DIR]
    (bin/mqi receive; the service deploy/systemd/mqi-communicator-receiver.service)
"""

from __future__ import annotations

import argparse
import logging
import signal
import ssl
import sys
import threading
from io import BytesIO
from pathlib import Path
from typing import Any, cast

from pydicom.uid import UID
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from mqi_communicator import settings
from mqi_communicator.dicomnet.activity import ReceiverActivity
from mqi_communicator.dicomnet.staging import ACCEPTED, StagingError, read_dataset_header, read_header, stage

LOG = logging.getLogger("mqi_communicator.dicomnet.receiver")
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700  # PS3.4 Table GG.4-1: Refused: Out of Resources (the sender may retry)
CANNOT_UNDERSTAND = 0xC000  # PS3.4 Table GG.4-1: Error: Cannot Understand
UNABLE_TO_PROCESS = 0xC211  # PS3.7 C.4.2.1.4 (0xC000-0xCFFF): what pynetdicom answers for a handler error


class ReceiverSettings:
    """The `dicom_network.receiver` section, paths resolved against the project folder."""

    def __init__(self, section: dict[str, Any], workdir: Path) -> None:
        self.enabled = bool(section["enabled"])
        self.ae_title = str(section["ae_title"])
        self.bind_address = str(section["bind_address"])
        self.port = int(section["port"])
        self.allowed = [str(t) for t in section["allowed_calling_ae_titles"]]
        self.staging = workdir / section["staging_directory"]
        self.state_file = workdir / section["state_file"]
        tls = section["tls"]
        self.tls = bool(tls["enabled"])
        self.certificate = workdir / tls["certificate"] if tls["certificate"] else None
        self.private_key = workdir / tls["private_key"] if tls["private_key"] else None
        self.client_ca = workdir / tls["client_ca_certificates"] if tls["client_ca_certificates"] else None

    def ssl_context(self) -> ssl.SSLContext | None:
        """The server's TLS context (None: plain TCP); ValueError naming what is missing."""
        if not self.tls:
            return None
        if self.certificate is None or self.private_key is None:
            raise ValueError("dicom_network.receiver.tls is enabled but certificate or private_key is empty")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2  # BCP 195, as PS3.15 B.9 asks
        try:
            context.load_cert_chain(self.certificate, self.private_key)
            if self.client_ca is not None:
                context.load_verify_locations(cafile=self.client_ca)
                context.verify_mode = ssl.CERT_REQUIRED
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(
                f"dicom_network.receiver.tls: {exc} (files {self.certificate}, {self.private_key}, {self.client_ca})"
            ) from exc
        return context


class Receiver:
    """One Storage SCP: `start` listens (in threads), `stop` closes it."""

    def __init__(self, config: ReceiverSettings) -> None:
        if not config.allowed:
            raise ValueError(
                "dicom_network.receiver.allowed_calling_ae_titles is empty: "
                "name the TPS/OIS AE titles allowed to send (every other one is rejected)"
            )
        self.config = config
        self.activity = ReceiverActivity(config.state_file, f"{config.ae_title}@{config.bind_address}:{config.port}")
        self.ae = AE(ae_title=config.ae_title)
        self.ae.require_calling_aet = config.allowed
        # No limit on the PDUs we receive: fewer, larger PDUs for 30 MB dose volumes.
        self.ae.maximum_pdu_size = 0
        for sop_class in ACCEPTED:
            self.ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
        self.ae.add_supported_context(Verification)
        self._server: Any = None

    def _on_store(self, event: Event) -> int:
        key = id(event.assoc)
        try:
            path = self._stage(event)
        except StagingError as exc:
            return self._failed(key, event, CANNOT_UNDERSTAND, str(exc))
        except OSError as exc:
            return self._failed(key, event, OUT_OF_RESOURCES, f"write refused: {exc}")
        except Exception as exc:  # a reader error on a malformed dataset: that object only, recorded
            return self._failed(key, event, UNABLE_TO_PROCESS, f"{type(exc).__name__}: {exc}")
        self.activity.stored(key)
        LOG.info("stored %s from %s", path, event.assoc.requestor.ae_title)
        return SUCCESS

    def _stage(self, event: Event) -> Path:
        # The dataset is written from pynetdicom's receive buffer as it is (no decode, no copy:
        # a 30 MB dose volume would otherwise be copied twice before the write).
        syntax = UID(event.context.transfer_syntax)
        if syntax.is_deflated:
            encoded = event.encoded_dataset()
            return stage(self.config.staging, read_header(encoded), [encoded])
        stream = cast(BytesIO, cast(C_STORE, event.request).DataSet)  # an EVT_C_STORE's request
        header = read_dataset_header(stream, syntax.is_implicit_VR, syntax.is_little_endian)
        prefix = b"\x00" * 128 + b"DICM" + encode_file_meta(event.file_meta)
        with stream.getbuffer() as body:
            return stage(self.config.staging, header, [prefix, body])

    def _failed(self, key: int, event: Event, status: int, message: str) -> int:
        uid = getattr(event.request, "AffectedSOPInstanceUID", "?")
        text = f"object {uid} from {event.assoc.requestor.ae_title}: {message} (answered 0x{status:04X})"
        LOG.error("%s", text)
        self.activity.error(key, text)
        return status

    def _on_accepted(self, event: Event) -> None:
        requestor = event.assoc.requestor
        peer = f"{requestor.address}:{requestor.port}"
        LOG.info("association from %s (%s) accepted", requestor.ae_title, peer)
        self.activity.association_started(id(event.assoc), requestor.ae_title, peer)

    def _on_rejected(self, event: Event) -> None:
        requestor = event.assoc.requestor
        text = f"association from {requestor.ae_title!r} ({requestor.address}) rejected: calling AE title not allowed"
        LOG.warning("%s", text)
        self.activity.error(None, text)

    def _on_ended(self, event: Event) -> None:
        # Released, aborted and connection-closed all end it; the first one seen records how.
        assoc = event.assoc
        outcome = "released" if assoc.is_released else "aborted" if assoc.is_aborted else "connection lost"
        self.activity.association_ended(id(assoc), outcome)

    def start(self) -> None:
        handlers: list[Any] = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_ended),
            (evt.EVT_ABORTED, self._on_ended),
            (evt.EVT_CONN_CLOSE, self._on_ended),
        ]
        address = (self.config.bind_address, self.config.port)
        self._server = self.ae.start_server(
            address, block=False, evt_handlers=handlers, ssl_context=self.config.ssl_context()
        )
        self.activity.listening(True)
        LOG.info("listening as %s on %s:%d%s", self.config.ae_title, *address, " (TLS)" if self.config.tls else "")

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self.activity.listening(False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mqi_communicator.dicomnet.receiver", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--configfile", default=None, help="the site's config (default: config/config.yaml)")
    parser.add_argument("--workdir", type=Path, default=Path.cwd(), help="the project folder (default: here)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        section = settings.load_site(args.configfile, args.workdir)["dicom_network"]["receiver"]
        config = ReceiverSettings(section, args.workdir.resolve())
        if not config.enabled:
            raise ValueError("dicom_network.receiver.enabled is false: nothing is received until the site turns it on")
        receiver = Receiver(config)
    except (OSError, ValueError) as exc:  # the configuration: exit 2, systemd does not restart
        print(f"mqi receive: {exc}", file=sys.stderr)
        return 2
    try:
        receiver.start()
    except ValueError as exc:  # the TLS files
        print(f"mqi receive: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. the port still held by a receiver stopping: systemd tries again
        print(f"mqi receive: cannot listen on {config.bind_address}:{config.port}: {exc}", file=sys.stderr)
        return 1
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
    LOG.info("stopping")
    receiver.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
