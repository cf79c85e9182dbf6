#!/usr/bin/env bash
# Creates compat/.venv-hf (the Hugging Face peers compat/hf_check.py runs in) from the pins in
# compat/requirements-hf.txt, if it is missing, and prints its python.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv-hf/bin/python ]; then
    python3 -m venv .venv-hf
    .venv-hf/bin/pip install --quiet --upgrade pip
    .venv-hf/bin/pip install --quiet -r requirements-hf.txt
fi
echo "$(pwd)/.venv-hf/bin/python"
