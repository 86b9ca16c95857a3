#!/usr/bin/env bash
# Run the test suite: sets up .venv first if needed, then pytest. Extra args go to pytest
# (e.g. `bash scripts/test.sh -m "not slow"` for the quick subset).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
exec .venv/bin/python -m pytest -q "$@"
