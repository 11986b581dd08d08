"""The delivery check (qa/delivery.check_beam) of one beam's fraction, a resumed layer as one log.

A delivery interrupted inside layer k and resumed at layer k logs layer k twice, each log a part
of the layer (docs/fractions.md). The check must see the layer whole, so the parts' rows are
joined in delivery order into one PTN file in a scratch folder for the duration of the check;
the result names the original files (`a/x_003.ptn + b/y_003.ptn`) instead of the scratch file.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mqi_communicator.files import sha256_of
from mqi_communicator.formats import ptn
from mqi_communicator.formats.plan import Beam
from mqi_communicator.intake.fractions import layer_parts, union_log
from mqi_communicator.qa import delivery


def check_beam(
    beam: Beam, deliveries: Sequence[Mapping[str, Any]], case_dir: Path, room: delivery.RoomCheck
) -> dict[str, Any]:
    """`delivery.check_beam` on the fraction's deliveries (intake manifest entries), each layer
    handed over as a delivery of its own: its one log, or the union of a resumed layer's logs."""
    with tempfile.TemporaryDirectory(prefix="mqi-resumed-layer-") as scratch:
        view: list[dict[str, Any]] = []
        sources: dict[str, str] = {}
        for number, parts in layer_parts(deliveries).items():
            if len(parts) == 1:
                part = parts[0]
                folder, entry = part.folder, dict(part.entry)
            else:
                rows, _code = union_log(case_dir, number, parts)
                # An absolute folder: check_beam reads `case_dir / folder`, which is then this one.
                folder = str(Path(scratch) / f"layer_{number:03d}")
                Path(folder).mkdir()
                path = Path(folder) / f"resumed_{number:03d}.ptn"
                ptn.write_ptn(path, rows)
                entry = {"file": path.name, "layer": number, "size": path.stat().st_size, "rows": len(rows)}
                entry["sha256"] = sha256_of(path)
                sources[f"{folder}/{path.name}"] = " + ".join(f"{p.folder}/{p.file}" for p in parts)
            # The rest of the delivery's manifest entry (beam, irradiation time) goes along.
            view.append(
                dict(parts[0].delivery)
                | {
                    "folder": folder,
                    "start_layer": number,
                    "stop_layer": number,
                    "layer_count": 1,
                    "dose1_range_codes": [parts[0].range_code],
                    "ptn": [entry],
                }
            )
        result = delivery.check_beam(beam, view, case_dir, room)
    for layer in result.get("layers", []):
        if isinstance(layer, dict) and layer.get("ptn") in sources:
            layer["ptn"] = sources[layer["ptn"]]
    return result
