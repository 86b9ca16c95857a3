"""python -m wavflow.demo [--config PATH] [key=value ...] — the one-command demo."""

from __future__ import annotations

import logging
import sys
from typing import Sequence

from wavflow.errors import WavFlowError


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s %(levelname)s] %(message)s")
    from wavflow.config import load_config, parse_cli
    from wavflow.demo.pipeline import describe, run_demo

    try:
        path, overrides = parse_cli(list(sys.argv[1:] if argv is None else argv), "demo.yaml")
        cfg = load_config(path, overrides, job="demo")
        result = run_demo(cfg)
    except WavFlowError as exc:
        logging.getLogger("wavflow.demo").error("%s: %s", type(exc).__name__, exc)
        return 2
    print(describe(result, int(cfg.demo.train.max_steps)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
