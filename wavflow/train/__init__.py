"""Training under torchrun: data set, trainer loop, EMA, LR schedule, checkpoints, samples.

Entry point: `python -m wavflow.train [--config PATH] [key=value ...]` (see `__main__.py`),
or `run_training(cfg)` from Python.
"""

from wavflow.train.trainer import Trainer, run_training

__all__ = ["Trainer", "run_training"]
