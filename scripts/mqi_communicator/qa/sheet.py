"""The QA sheet of a case: one self-contained HTML file (pictures embedded as PNG) and per-beam
figures: gamma map, dose-difference map, TPS and delivered profiles through the isocentre
along both axes, and the gamma histogram."""

from __future__ import annotations

import base64
import html
import io
import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from mqi_communicator.files import write_atomic

COLOURS = {"PASS": "#1b7f3b", "REVIEW": "#b36b00", "NOT ASSESSED": "#555555", "FAIL": "#b00020", "ERROR": "#6a0dad"}


def beam_figure(arrays: dict[str, Any], title: str, iso: tuple[float, float]) -> bytes:
    """PNG: gamma map, dose difference, profiles along both axes, gamma histogram."""
    tps = arrays["tps"]
    delivered = arrays["delivered_on_tps"]
    gamma = arrays["gamma"]
    rows, cols = tps.row_mm, tps.col_mm
    peak = float(tps.dose.max())
    axis_c, axis_r = tps.axes[0], tps.axes[1]
    units = arrays.get("units", "")
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.6))
    half = abs(cols[1] - cols[0]) / 2
    extent = (cols[0] - half, cols[-1] + half, rows[0] - half, rows[-1] + half)
    # origin="lower": patient z (or y) increases upwards, as a physicist reads a coronal plane.
    shown = axes[0, 0].imshow(
        gamma, extent=extent, origin="lower", cmap="RdYlGn_r", vmin=0, vmax=2, interpolation="nearest"
    )
    axes[0, 0].set_title("gamma (grey: below the cutoff)")
    axes[0, 0].set_facecolor("#dddddd")
    fig.colorbar(shown, ax=axes[0, 0])
    diff = 100.0 * (delivered - tps.dose) / peak
    diff = np.where(tps.dose >= 0.1 * peak, diff, np.nan)
    shown = axes[0, 1].imshow(
        diff, extent=extent, origin="lower", cmap="coolwarm", vmin=-5, vmax=5, interpolation="nearest"
    )
    axes[0, 1].set_title("delivered - TPS (% of TPS max)")
    axes[0, 1].set_facecolor("#dddddd")
    fig.colorbar(shown, ax=axes[0, 1])
    support_c = np.flatnonzero(tps.dose.max(axis=0) >= 0.02 * peak)
    support_r = np.flatnonzero(tps.dose.max(axis=1) >= 0.02 * peak)
    for ax in axes[0, :2]:
        ax.set_xlabel(f"patient {axis_c} (mm)")
        ax.set_ylabel(f"patient {axis_r} (mm)")
        if support_c.size and support_r.size:
            ax.set_xlim(cols[support_c[0]] - 15, cols[support_c[-1]] + 15)
            ax.set_ylim(rows[support_r[0]] - 15, rows[support_r[-1]] + 15)
    valid = gamma[np.isfinite(gamma)]
    axes[0, 2].hist(np.minimum(valid, 2.0), bins=np.linspace(0, 2, 41), color="tab:gray")
    axes[0, 2].axvline(1.0, color="k", linestyle=":")
    axes[0, 2].set_xlabel("gamma")
    axes[0, 2].set_ylabel("points")
    axes[0, 2].set_title("gamma histogram (values above 2 shown as 2)")
    # One panel per direction, so neither profile hides the other.
    r0, c0 = int(np.argmin(np.abs(rows - iso[1]))), int(np.argmin(np.abs(cols - iso[0])))
    for ax, (positions, tps_line, del_line, name, at, support) in zip(
        axes[1, :2],
        (
            (cols, tps.dose[r0, :], delivered[r0, :], axis_c, f"{axis_r} = {rows[r0]:.1f} mm", support_c),
            (rows, tps.dose[:, c0], delivered[:, c0], axis_r, f"{axis_c} = {cols[c0]:.1f} mm", support_r),
        ),
        strict=True,
    ):
        ax.plot(positions, tps_line, color="k", label="TPS (reference)")
        ax.plot(positions, del_line, color="tab:red", linestyle="--", label="delivered")
        if support.size:
            ax.set_xlim(positions[support[0]] - 15, positions[support[-1]] + 15)
        ax.set_xlabel(f"patient {name} (mm)")
        ax.set_ylabel(f"dose ({units})")
        ax.set_title(f"profile along {name} through the isocentre ({at})")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    axes[1, 2].axis("off")
    axes[1, 2].text(0.0, 0.9, "\n".join(arrays.get("numbers", [])), va="top", fontsize=10, family="monospace")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    return buffer.getvalue()


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _badge(verdict: str) -> str:
    return f'<span class="badge" style="background:{COLOURS.get(verdict, "#333")}">{html.escape(verdict)}</span>'


def labels_html(qa: dict[str, Any]) -> str:
    """The case's labels (PLAN-BASED, FLAGGED, DOSE SCALE NOT VERIFIED) as tags in the banner."""
    return "".join(f" <span class='label'>[{html.escape(label)}]</span>" for label in qa.get("labels", []))


def facts_line(qa: dict[str, Any]) -> str:
    """One sentence: the calibration the dose scale rests on and the fraction assessed."""
    calibration = qa.get("calibration") or {}
    if calibration.get("state") == "current":
        scale = (
            f"Dose scale: calibration of {calibration['date'][:10]} by {calibration['set_by']} "
            f"({calibration['method']}, {calibration['gy_per_unit']:.6g} Gy per unit)"
        )
    else:
        scale = str(calibration.get("reason") or "Dose scale: not recorded").capitalize()
    fraction = qa.get("fraction_assessed") or {}
    if fraction.get("source") == "plan":
        assessed = "dose computed from the plan (no delivery logs)"
    elif fraction.get("fraction"):
        when = fraction.get("last_irradiation") or "?"
        assessed = f"fraction {fraction['fraction']} of {fraction['fractions_delivered']} delivered (logs of {when})"
    else:
        assessed = "fraction not recorded"
    return f"{scale}. Assessed: {assessed}."


def render(qa: dict[str, Any], figures: dict[str, bytes], signoff_lines: list[str] | None = None) -> str:
    """The sheet as one HTML string (figures: beam name -> PNG bytes; signoff_lines: the sign-off
    block as it stood when the sheet was written, qa/signoff_record.block_lines)."""
    verdict = qa["verdict"]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>QA {html.escape(qa['case_id'])}: {html.escape(verdict)}</title>",
        "<style>body{font-family:sans-serif;margin:1.5em;max-width:70em}"
        ".banner{color:#fff;padding:.8em 1.2em;font-size:1.5em;border-radius:4px}"
        ".badge{color:#fff;padding:.1em .5em;border-radius:3px}"
        "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #bbb;padding:.2em .5em;font-size:.9em}"
        ".note{background:#fff5d6;padding:.4em .8em;border-left:4px solid #b36b00}</style></head><body>",
        f"<div class='banner' style='background:{COLOURS.get(verdict, '#333')}'>Case {html.escape(qa['case_id'])}: "
        f"{html.escape(verdict)}{labels_html(qa)}</div>",
        f"<p>Room {html.escape(str(qa.get('room')))}, plan {html.escape(str(qa.get('plan_sop_instance_uid')))}; "
        f"engine: {html.escape(str(qa['provenance'].get('engine')))}. The case takes its worst beam's verdict.</p>",
        f"<p class='facts'>{html.escape(facts_line(qa))}</p>",
    ]
    if signoff_lines:
        # The sheet is a workflow output and never rewritten: it shows the sign-off as it stood
        # when it was written; a signature makes a new PDF version (docs/sign-off.md).
        items = "".join(f"<li>{html.escape(line)}</li>" for line in signoff_lines)
        parts.append(
            f"<div class='signoff'><h2>Review and sign-off (when this sheet was written)</h2><ul>{items}</ul></div>"
        )
    for beam in qa["beams"]:
        dose, delivery = beam["dose"], beam["delivery"]
        parts.append(f"<h2>Beam {beam['number']} {html.escape(beam['name'])}: {_badge(beam['verdict'])}</h2>")
        parts.append(
            f"<p>Dose (delivered vs TPS): {_badge(dose['verdict'])} {html.escape('; '.join(dose['reasons']))}<br>"
            f"Delivery (log vs plan): {_badge(delivery['verdict'])} {html.escape('; '.join(delivery['reasons']) or 'all layers within tolerance')}</p>"
        )
        for note in dose.get("notes", []):
            parts.append(f"<p class='note'>{html.escape(note)}</p>")
        if "evaluation" in dose:
            parts.append(f"<p>Evaluation: {html.escape(dose['evaluation'])}</p>")
        if "gamma_primary" in dose:
            rows = []
            for key in ("gamma_primary", "gamma_secondary"):
                g = dose[key]
                rows.append(
                    [
                        g["criteria"],
                        f"{g['cutoff_percent']:g} %",
                        g["pass_rate_percent"],
                        g["points_evaluated"],
                        g["gamma_mean"] and round(g["gamma_mean"], 3),
                    ]
                )
            parts.append(_table(["gamma criteria", "low-dose cutoff", "pass rate (%)", "points", "mean gamma"], rows))
            parts.append(
                f"<p>Mean dose difference in the TPS &ge; {dose['high_dose_region_percent']} % region: "
                f"{dose['mean_dose_difference_percent']:+.2f} % ({dose['comparison']} comparison). TPS dose: "
                f"{html.escape(str(beam.get('tps_dose')))}</p>"
            )
        if beam["name"] in figures:
            data = base64.b64encode(figures[beam["name"]]).decode()
            parts.append(
                f"<img alt='QA figures of beam {html.escape(beam['name'])}' src='data:image/png;base64,{data}'>"
            )
        if delivery.get("layers"):
            rows = [
                [
                    layer["layer"],
                    f"{layer['energy_mev']:g}",
                    f"{layer['spots_logged']}/{layer['spots_planned']}",
                    # Per axis, as the limits apply (docs/delivery-check.md).
                    f"{layer['position_mean_x_mm']:+.2f} / {layer['position_mean_y_mm']:+.2f}",
                    f"{layer['position_sd_x_mm']:.2f} / {layer['position_sd_y_mm']:.2f}",
                    f"{layer['position_max_x_mm']:.2f} / {layer['position_max_y_mm']:.2f}",
                    f"{layer['spot_mu_max_diff_percent']:+.2f}",
                    f"{layer['layer_mu_diff_percent']:+.2f}",
                    "; ".join(layer["flags"]) or "ok",
                ]
                for layer in delivery["layers"]
            ]
            parts.append(
                _table(
                    [
                        "layer",
                        "MeV",
                        "spots logged/planned",
                        "pos. mean x / y (mm)",
                        "pos. SD x / y (mm)",
                        "pos. max |d| x / y (mm)",
                        "spot MU max diff (%)",
                        "layer MU diff (%)",
                        "flags",
                    ],
                    rows,
                )
            )
    criteria = qa["criteria"]
    parts.append("<h2>Criteria</h2><pre>" + html.escape(_yaml_like(criteria)) + "</pre>")
    prov = qa["provenance"]
    parts.append("<h2>Provenance</h2>")
    parts.append(_table(["input", "sha256"], [[k, v] for k, v in prov["inputs"].items()]))
    parts.append(_table(["software", "version"], [[k, v] for k, v in prov["software"].items()]))
    parts.append(f"<p>Written {html.escape(prov['written'])}.</p></body></html>")
    return "\n".join(parts)


def _yaml_like(value: Any, indent: int = 0) -> str:
    if isinstance(value, dict):
        return "\n".join(
            " " * indent + f"{k}:" + (("\n" + _yaml_like(v, indent + 2)) if isinstance(v, dict) else f" {v}")
            for k, v in value.items()
        )
    return " " * indent + str(value)


def write_sheet(
    path: Path, qa: dict[str, Any], figures: dict[str, bytes], signoff_lines: list[str] | None = None
) -> None:
    write_atomic(path, render(qa, figures, signoff_lines).encode())


FIGURE_PATTERN = re.compile(r"<img alt='QA figures of beam (.*?)' src='data:image/png;base64,([A-Za-z0-9+/=]+)'>")


def embedded_figures(sheet_html: str) -> dict[str, bytes]:
    """The per-beam figures a sheet written by `render` embeds (beam name -> PNG bytes): a signed
    PDF version shows the very figures of the sheet, which the workflow does not keep elsewhere."""
    return {html.unescape(name): base64.b64decode(data) for name, data in FIGURE_PATTERN.findall(sheet_html)}
