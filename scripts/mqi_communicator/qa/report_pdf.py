"""The PDF QA report of a case: the QA sheet's content on printable A4 pages (docs/qa-report-pdf.md).

Page 1: the verdict banner with the case's labels, room, plan, engine, dose scale and fraction
assessed, one line per beam, and the sign-off block. Then per beam: its verdicts and reasons,
gamma numbers, the sheet's figure (gamma and difference maps, profiles, histogram) and the
delivery check per layer. Last: criteria, calibration, the inputs with their sha256 and the
software versions. Drawn with matplotlib's PDF backend (already a dependency); TrueType fonts
are embedded so the text can be searched and extracted (pdftotext).
"""

from __future__ import annotations

import io
import textwrap
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.image as mpimg
import matplotlib.pyplot as plt
from matplotlib.backends.backend_pdf import PdfPages
from matplotlib.figure import Figure

from mqi_communicator.files import atomic_output
from mqi_communicator.qa.sheet import COLOURS, facts_line

A4_INCHES = (8.27, 11.69)
MARGIN = 0.06  # of the page height/width
LINE = 0.0155  # height of a 9 pt line, as a fraction of the page height


class _Pages:
    """A4 pages filled top to bottom; a new page starts when the next item does not fit."""

    def __init__(self, pdf: PdfPages, footer: str) -> None:
        self.pdf, self.footer, self.number = pdf, footer, 0
        self.figure: Figure | None = None
        self.y = 0.0

    def _page(self) -> Figure:
        if self.figure is None:
            self.figure = plt.figure(figsize=A4_INCHES)
            self.number += 1
            self.y = 1 - MARGIN
        return self.figure

    def new_page(self) -> None:
        if self.figure is not None:
            self.figure.text(0.5, MARGIN / 2, f"{self.footer} - page {self.number}", ha="center", fontsize=7)
            self.pdf.savefig(self.figure)
            plt.close(self.figure)
            self.figure = None

    def _room(self, height: float) -> Figure:
        page = self._page()
        if self.y - height < MARGIN and self.y < 1 - MARGIN:
            self.new_page()
            page = self._page()
        return page

    def text(self, line: str, *, size: float = 9, bold: bool = False, mono: bool = False, width: int = 110) -> None:
        for part in textwrap.wrap(line, width=width, subsequent_indent="  ") or [""]:
            height = LINE * size / 9
            page = self._room(height)
            page.text(
                MARGIN,
                self.y - height,
                part,
                fontsize=size,
                weight="bold" if bold else "normal",
                family="monospace" if mono else "sans-serif",
            )
            self.y -= height

    def gap(self, lines: float = 0.6) -> None:
        self.y -= LINE * lines

    def banner(self, line: str, colour: str) -> None:
        height = 0.05
        page = self._room(height)
        page.patches.append(
            matplotlib.patches.Rectangle(
                (MARGIN, self.y - height), 1 - 2 * MARGIN, height, transform=page.transFigure, color=colour
            )
        )
        page.text(MARGIN + 0.015, self.y - height / 2, line, fontsize=14, color="white", weight="bold", va="center")
        self.y -= height + LINE

    def image(self, png: bytes) -> None:
        picture = mpimg.imread(io.BytesIO(png), format="png")
        width = 1 - 2 * MARGIN
        height = width * picture.shape[0] / picture.shape[1] * A4_INCHES[0] / A4_INCHES[1]
        page = self._room(height)
        axes = page.add_axes((MARGIN, self.y - height, width, height))
        axes.imshow(picture, interpolation="antialiased")
        axes.axis("off")
        self.y -= height + LINE / 2


def _gamma_lines(dose: dict[str, Any]) -> list[str]:
    lines = []
    for key in ("gamma_primary", "gamma_secondary"):
        g = dose[key]
        mean = "-" if g["gamma_mean"] is None else f"{g['gamma_mean']:.3f}"
        lines.append(
            f"gamma {g['criteria']}, low-dose cutoff {g['cutoff_percent']:g} %: pass rate "
            f"{g['pass_rate_percent']} % of {g['points_evaluated']} points, mean gamma {mean}"
        )
    lines.append(
        f"Mean dose difference in the TPS >= {dose['high_dose_region_percent']} % region: "
        f"{dose['mean_dose_difference_percent']:+.2f} % ({dose['comparison']} comparison)"
    )
    return lines


def _layer_line(layer: dict[str, Any]) -> str:
    # Per axis, as the limits apply (docs/delivery-check.md); columns as LAYER_HEADER.
    spots = f"{layer['spots_logged']}/{layer['spots_planned']}"
    return (
        f"{layer['layer']:>5} {layer['energy_mev']:>7g} {spots:>14}"
        f" {layer['position_mean_x_mm']:+6.2f}/{layer['position_mean_y_mm']:+6.2f}"
        f" {layer['position_sd_x_mm']:5.2f}/{layer['position_sd_y_mm']:5.2f}"
        f" {layer['position_max_x_mm']:5.2f}/{layer['position_max_y_mm']:5.2f}"
        f" {layer['spot_mu_max_diff_percent']:+8.2f} {layer['layer_mu_diff_percent']:+9.2f}  "
        + ("; ".join(layer["flags"]) or "ok")
    )


LAYER_HEADER = (
    f"{'layer':>5} {'MeV':>7} {'spots log/plan':>14} {'mean x/y mm':>13} {'SD x/y mm':>11}"
    f" {'max x/y mm':>11} {'spot MU%':>8} {'layer MU%':>9}  flags"
)


def _beam_section(pages: _Pages, beam: dict[str, Any], figure: bytes | None) -> None:
    dose, delivery = beam["dose"], beam["delivery"]
    pages.new_page()
    pages.banner(f"Beam {beam['number']} {beam['name']}: {beam['verdict']}", COLOURS.get(beam["verdict"], "#333333"))
    pages.text(f"Dose (delivered vs TPS): {dose['verdict']} - {'; '.join(dose['reasons'])}")
    reasons = "; ".join(delivery["reasons"]) or "all layers within tolerance"
    pages.text(f"Delivery (log vs plan): {delivery['verdict']} - {reasons}")
    for note in dose.get("notes", []):
        pages.text(f"Note: {note}")
    if "evaluation" in dose:
        pages.text(f"Evaluation: {dose['evaluation']}")
    if "gamma_primary" in dose:
        for line in _gamma_lines(dose):
            pages.text(line)
        pages.text(f"TPS dose: {beam.get('tps_dose')}", size=7, mono=True, width=120)
    pages.gap()
    if figure is not None:
        pages.image(figure)
    else:
        pages.text("(no figures: the dose line was not assessed)")
    if delivery.get("layers"):
        pages.gap()
        pages.text("Delivery check per layer", bold=True)
        pages.text(LAYER_HEADER, size=6.5, mono=True, width=140)
        for layer in delivery["layers"]:
            pages.text(_layer_line(layer), size=6.5, mono=True, width=140)


def _flatten(value: Any, prefix: str = "") -> list[str]:
    if isinstance(value, dict):
        return [line for k, v in value.items() for line in _flatten(v, f"{prefix}{k}.")]
    return [f"{prefix.rstrip('.')}: {value}"]


def write_pdf(path: Path, qa: dict[str, Any], figures: dict[str, bytes], signoff_lines: list[str]) -> None:
    """Write the PDF QA report (figures: beam name -> the sheet's PNG; signoff_lines: the block
    of qa/signoff_record.block_lines)."""
    labels = "".join(f" [{label}]" for label in qa.get("labels", []))
    with (
        matplotlib.rc_context({"pdf.fonttype": 42, "font.family": "DejaVu Sans"}),
        atomic_output(path) as handle,
        PdfPages(
            handle, metadata={"Title": f"QA {qa['case_id']}: {qa['verdict']}", "Creator": "mqi_communicator"}
        ) as pdf,
    ):
        pages = _Pages(pdf, f"QA report {qa['case_id']} ({qa['verdict']})")
        pages.banner(f"Case {qa['case_id']}: {qa['verdict']}{labels}", COLOURS.get(qa["verdict"], "#333333"))
        if qa.get("labels"):
            pages.text("Labels: " + ", ".join(qa["labels"]), bold=True)
        pages.text(f"Room {qa.get('room')}, plan {qa.get('plan_sop_instance_uid')}")
        pages.text(f"Engine: {qa['provenance'].get('engine')}. The case takes its worst beam's verdict.")
        pages.text(facts_line(qa))
        pages.gap()
        pages.text("Beams", bold=True)
        for beam in qa["beams"]:
            gamma = beam["dose"].get("gamma_primary")
            rate = f", gamma {gamma['criteria']} pass rate {gamma['pass_rate_percent']} %" if gamma else ""
            pages.text(
                f"Beam {beam['number']} {beam['name']}: {beam['verdict']} (dose {beam['dose']['verdict']}, "
                f"delivery {beam['delivery']['verdict']}){rate}"
            )
        pages.gap()
        pages.text("Review and sign-off", bold=True, size=11)
        for line in signoff_lines:
            pages.text(line, mono=line.startswith("qa.json"), size=8 if line.startswith("qa.json") else 9)
        pages.gap(2)
        pages.text("Reviewed by (name, signature): ______________________________   Date: ______________")
        for beam in qa["beams"]:
            _beam_section(pages, beam, figures.get(beam["name"]))
        pages.new_page()
        pages.text("Criteria", bold=True, size=11)
        for line in _flatten(qa["criteria"]):
            pages.text(line, size=7.5, mono=True, width=125)
        pages.gap()
        pages.text("Calibration (dose scale)", bold=True, size=11)
        for line in _flatten(qa.get("calibration") or {"state": "not recorded"}):
            pages.text(line, size=7.5, mono=True, width=125)
        prov = qa["provenance"]
        pages.gap()
        pages.text("Inputs (sha256)", bold=True, size=11)
        for name, digest in prov["inputs"].items():
            pages.text(name, size=7, mono=True, width=130)
            pages.text(f"  sha256 {digest}", size=7, mono=True, width=130)
        pages.gap()
        pages.text("Software", bold=True, size=11)
        for name, version in prov["software"].items():
            pages.text(f"{name} {version}", size=8, mono=True)
        pages.text(f"Written {prov['written']}.")
        pages.new_page()
