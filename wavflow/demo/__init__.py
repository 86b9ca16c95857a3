"""The built-in procedural audio-visual data set of the demo and the metrics that score it.

`make_dataset` writes short clips of sound events (six classes) with a matching on-screen shape
at each event onset and captions naming the class; `metrics` scores generated audio against them
(event-class accuracy, onset timing error, Fréchet distance of log-mel frames).

Names are imported lazily so `python -m wavflow.demo.make_dataset` / `.metrics` run cleanly.
The builder function is `wavflow.demo.make_dataset.make_dataset` (the package attribute
`make_dataset` is the submodule of the same name).
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "load_dataset_info": "wavflow.demo.make_dataset",
    "DatasetInfo": "wavflow.demo.make_dataset",
    "ClipInfo": "wavflow.demo.make_dataset",
    "CLASS_NAMES": "wavflow.demo.sound_events",
    "EVENT_CLASSES": "wavflow.demo.sound_events",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'wavflow.demo' has no attribute {name!r}")
