#!/usr/bin/env bash
# Set up, then run the main job on the embedded default: the bundled sample cases
# (sample_cases/) through the local profile (profiles/default) and the built-in engine.
set -euo pipefail
cd "$(dirname "$0")"
envs/setup.sh
.venv/bin/snakemake "$@"
echo
echo "Done. Per case, under data/cases/<case_id>/:"
echo "  intermediate/intake.json      the intake manifest (plan, room, beams, deliveries)"
echo "  intermediate/moqui_csv/       P2 output: plan/ and log/<beam>/<NN>_<E>MeV.csv"
echo "Logs: logs/<case_id>/"
