"""`python -m wavflow.train [--config PATH] [-m] [key=value ...]` (default config: train.yaml).

Run it directly for one process, or under torchrun (scripts/launch/train_*.sh) for DDP. With
`-m` (outside torchrun) it runs a sweep, one process per point (wavflow/train/sweep.py).
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

from wavflow.config import load_config, parse_launch
from wavflow.errors import ConfigError
from wavflow.exit_codes import EXIT_OK, run_job
from wavflow.train.sweep import run_sweep

DEFAULT_CONFIG = "train.yaml"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_job("train", lambda: _train(argv))


def _train(argv: list[str]) -> int:
    args = parse_launch(argv, DEFAULT_CONFIG)
    if args.multirun:
        if "LOCAL_RANK" in os.environ:
            # every rank would start the whole sweep: torchrun inside torchrun
            raise ConfigError(
                "-m under torchrun: sweeps are expanded by the launcher, one torchrun per point "
                "(bash scripts/launch/train_single_node.sh -m ...)"
            )
        return run_sweep(args.config, args.overrides)
    cfg = load_config(args.config, args.overrides, job="train")
    from wavflow.train.trainer import run_training  # heavy imports after the config is known good

    run_training(cfg)
    return EXIT_OK

if __name__ == "__main__":
    sys.exit(main())
