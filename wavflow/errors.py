"""Typed errors. Every message names the file, row or key at fault."""

from __future__ import annotations


class WavFlowError(Exception):
    """Base class of every error WavFlow raises on purpose."""


class ConfigError(WavFlowError):
    """A config key is unknown, of the wrong type, or inconsistent with another key."""


class AudioError(WavFlowError):
    """An audio file is missing, unreadable, empty, silent or holds non-finite samples."""


class VideoError(WavFlowError):
    """A video file is missing, unreadable, too short or has no video stream."""


class ManifestError(WavFlowError):
    """A CSV manifest is malformed (columns, ids, flags, paths)."""


class CheckpointError(WavFlowError):
    """A checkpoint is corrupt or does not match the model it is loaded into."""


class WeightsError(WavFlowError):
    """Pretrained encoder weights are missing and cannot be fetched."""


class FeatureError(WavFlowError):
    """A cached feature file is missing, unreadable or holds tensors of the wrong shape."""


class RowsFailedError(WavFlowError):
    """More rows failed than data.max_failed_fraction allows, or none succeeded: the job's
    result is not what was asked for (exit code 1)."""


class RuntimeFailure(WavFlowError):
    """The job started on good input but could not go on (e.g. training diverged: a run of
    non-finite gradients). Exit code 4, one line, no traceback."""
