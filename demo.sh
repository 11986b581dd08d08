#!/usr/bin/env bash
# Set up, then run the main job on the embedded default: the bundled sample cases
# (sample_cases/) through the local profile (profiles/default) and the built-in engine,
# and write the HTML report.
set -euo pipefail
cd "$(dirname "$0")"
envs/setup.sh
.venv/bin/snakemake "$@"
.venv/bin/snakemake --report report.html "$@"
cat <<'MSG'

Done. Per case, under data/cases/<case_id>/:
  dicom/RD_<beam>.dcm (RD_PLAN.dcm)        RT Dose per beam (plan sum when beams share a geometry)
  raw/<beam>_Dose.raw                      the engine's raw dose (MOQUI format)
  intermediate/intake.json                 intake manifest (plan, room, beams, deliveries)
  intermediate/moqui_csv/                  P2 output: plan/ and log/<beam>/<NN>_<E>MeV.csv
  intermediate/moqui/<beam>/               MOQUI parameter file and the beam's logFilePath
  intermediate/case_summary.json           what was computed, per beam, and the QA verdict
  intermediate/qa/qa_sheet.html, qa.json   the QA sheet (README: "Reading the QA sheet")
Report: report.html (dose maps, profiles, beam tables, QA sheets, QA trend). Logs: logs/<case_id>/
The built-in engine is an analytical pencil-beam approximation, not Monte Carlo; its doses are in Gy
through the shipped calibration of the built-in engine (config/calibration.yaml; docs/qa.md).
MSG
