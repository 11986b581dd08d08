"""C-ECHO: is a DICOM peer (a destination, or our own receiver) reachable and willing to associate?

python -m mqi_communicator.dicomnet.echo HOST PORT AE_TITLE [--calling-ae AET] [--timeout S]
(bin/mqi echo); exit status 0 when the peer answered Success.
"""

from __future__ import annotations

import argparse
import sys

from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

DEFAULT_CALLING_AE = "MQI_COMMUNICATOR"


def echo(host: str, port: int, called_ae: str, calling_ae: str = DEFAULT_CALLING_AE, timeout: float = 10) -> str:
    """'success', or why not (association rejected or aborted, no answer, a failure status)."""
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    assoc = ae.associate(host, port, ae_title=called_ae)
    if assoc.is_rejected:
        return f"association rejected by {called_ae}@{host}:{port} (is {calling_ae} an allowed calling AE title there?)"
    if not assoc.is_established:
        return f"no association with {called_ae}@{host}:{port} (not listening, unreachable, or aborted)"
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    if not status:
        return f"no C-ECHO answer from {called_ae}@{host}:{port} within {timeout:g} s"
    code = int(status.Status)
    return "success" if code == 0 else f"C-ECHO answered status 0x{code:04X}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mqi_communicator.dicomnet.echo", description=__doc__.splitlines()[0]
    )
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("ae_title", help="the peer's (called) AE title")
    parser.add_argument("--calling-ae", default=DEFAULT_CALLING_AE, help="our AE title (default %(default)s)")
    parser.add_argument("--timeout", type=float, default=10, help="seconds per step (default %(default)s)")
    args = parser.parse_args(argv)
    result = echo(args.host, args.port, args.ae_title, args.calling_ae, args.timeout)
    print(f"C-ECHO {args.ae_title}@{args.host}:{args.port}: {result}")
    return 0 if result == "success" else 1


if __name__ == "__main__":
    sys.exit(main())
