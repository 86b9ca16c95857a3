"""python -m wavflow.evaluate --generated DIR --reference CSV [--infer-csv CSV] [--out DIR] [key=value ...]

Exit codes: 0 when every enabled metric was computed for every pair; 1 when something was
left out (ids missing / unreadable on a side, a metric without weights), with metrics.json
and the table still written; 2 when the job cannot start (config, CSVs, no pair at all).
"""

from __future__ import annotations

import os

# The evaluator never downloads: packages that reach for the Hugging Face hub stay offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import sys  # noqa: E402

from wavflow.evaluate.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
