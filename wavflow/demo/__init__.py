"""The built-in audio-visual data sets of the demo and the metrics that score them.

`make_dataset` writes short clips of procedural sound events (`shapes`, six classes) or of
recorded instrument samples (`instruments`, eight instruments), with a picture that reacts on
each event's onset frame and captions naming the class (docs/datasets.md); `metrics` scores
generated audio against them per mode (class accuracy, onset timing error, level, noise floor,
Fréchet distance of log-mel frames).

Names are imported lazily so `python -m wavflow.demo.make_dataset` / `.metrics` run cleanly.
The builder function is `wavflow.demo.make_dataset.make_dataset` (the package attribute
`make_dataset` is the submodule of the same name).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_dataset_info": "wavflow.demo.make_dataset",
    "DatasetInfo": "wavflow.demo.make_dataset",
    "ClipInfo": "wavflow.demo.make_dataset",
    "CLASS_NAMES": "wavflow.demo.sound_events",
    "EVENT_CLASSES": "wavflow.demo.sound_events",
    "DATASETS": "wavflow.demo.make_dataset",
    "INSTRUMENTS": "wavflow.demo.instruments",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'wavflow.demo' has no attribute {name!r}")
