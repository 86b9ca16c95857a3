"""`python -m wavflow.train [--config PATH] [key=value ...]` (default config: train.yaml).

Run it directly for one process, or under torchrun (scripts/launch/train_*.sh) for DDP.
"""

from __future__ import annotations

import sys
from typing import Sequence

from wavflow.config import load_config, parse_cli
from wavflow.errors import WavFlowError

DEFAULT_CONFIG = "train.yaml"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        path, overrides = parse_cli(argv, DEFAULT_CONFIG)
        cfg = load_config(path, overrides)
        from wavflow.train.trainer import run_training  # heavy imports after the config is known good

        run_training(cfg)
    except WavFlowError as exc:
        print(f"[wavflow.train] error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
