"""python -m wavflow.demo [--config PATH] [key=value ...] — the one-command demo."""

from __future__ import annotations

import logging
import sys
from typing import Sequence

from wavflow.config import load_config, parse_cli
from wavflow.exit_codes import EXIT_OK, run_job


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s %(levelname)s] %(message)s")
    return run_job("demo", lambda: _demo(list(sys.argv[1:] if argv is None else argv)))


def _demo(argv: list[str]) -> int:
    path, overrides = parse_cli(argv, "demo.yaml")
    cfg = load_config(path, overrides, job="demo")
    # heavy imports after the config is known good: the pipeline pulls scipy.signal and
    # matplotlib.pyplot (~2 s), which a config error should not wait for
    from wavflow.demo.pipeline import describe, run_demo

    result = run_demo(cfg)
    print(describe(result, int(cfg.demo.train.max_steps)))
    return EXIT_OK

if __name__ == "__main__":
    sys.exit(main())
