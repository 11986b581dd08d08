#!/usr/bin/env bash
# Set up mqi_communicator on a Debian machine: the system packages it needs (apt), then the
# pinned Python packages in .venv (pip). Safe to rerun: it only installs what is missing or
# changed.   envs/setup.sh          the pipeline
#            envs/setup.sh --dev    the pipeline plus test and lint tools (envs/requirements-dev.txt)
set -euo pipefail
cd "$(dirname "$0")/.."

requirements=envs/requirements.txt
[[ "${1:-}" == "--dev" ]] && requirements=envs/requirements-dev.txt

missing=()
command -v python3 >/dev/null || missing+=(python3)
# Debian splits venv/ensurepip out of python3.
python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
# --dev: the independent peers the tests start (docs/dicom-network.md, docs/encodings.md):
# dcmtk's storescu/echoscu/storescp send to our receiver and its dcmconv re-encodes plans and
# doses; Orthanc is the archive our sender stores into; poppler-utils' pdftotext/pdftoppm read
# the PDF QA reports back (docs/qa-report-pdf.md); headless chromium renders the overview page
# (docs/overview-page.md). The pipeline itself needs none of them.
if [[ "${1:-}" == "--dev" ]]; then
    command -v storescu >/dev/null && command -v dcmconv >/dev/null || missing+=(dcmtk)
    command -v Orthanc >/dev/null || missing+=(orthanc)
    command -v pdftotext >/dev/null || missing+=(poppler-utils)
    command -v chromium >/dev/null || missing+=(chromium)
fi
if ((${#missing[@]})); then
    sudo=""
    [[ $(id -u) -ne 0 ]] && sudo=sudo
    echo "setup: installing system packages: ${missing[*]}"
    $sudo apt-get update -q
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

[[ -x .venv/bin/python ]] || python3 -m venv .venv
stamp=.venv/.installed-$(basename "$requirements" .txt)
digest=$(cat envs/requirements*.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [[ "$(cat "$stamp" 2>/dev/null)" != "$digest" ]]; then
    echo "setup: installing Python packages from $requirements into .venv"
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -r "$requirements"
    .venv/bin/python -m pip install -q --no-deps -e .
    echo "$digest" >"$stamp"
fi
# Byte-compile the package (the venv's packages pip compiled): every CLI the pipeline starts then
# loads .pyc files instead of compiling its modules again, also where PYTHONDONTWRITEBYTECODE is
# set. Stale ones are ignored by Python (source newer), so a rerun after an edit refreshes them.
.venv/bin/python -m compileall -q scripts/mqi_communicator scripts/snakemake_logger_plugin_mqi >/dev/null
