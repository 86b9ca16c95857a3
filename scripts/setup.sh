#!/usr/bin/env bash
# Create .venv and install WavFlow with everything it needs. Safe to run again: it only
# installs what is missing (pip skips satisfied requirements).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PYTHON --version 2>&1)"
  "$PYTHON" -m venv .venv
fi
py=.venv/bin/python
stamp=.venv/.wavflow-setup-stamp
want="$(cat requirements.txt requirements-nodeps.txt pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$py" -c "import wavflow, torch, open_clip, av" 2>/dev/null; then
  echo "[setup] .venv is up to date"
  exit 0
fi
"$py" -m pip install --quiet --upgrade pip
# torch first and alone, so a newer torch is never pulled in by a dependency.
"$py" -m pip install --quiet torch==2.14.1 torchvision==0.29.1 torchaudio==2.11.0
"$py" -m pip install --quiet -r requirements.txt
"$py" -m pip install --quiet --no-deps -r requirements-nodeps.txt
"$py" -m pip install --quiet --no-deps -e .
echo "$want" > "$stamp"
echo "[setup] done: $("$py" -c 'import torch, torchaudio; print("torch", torch.__version__, "torchaudio", torchaudio.__version__)')"
