"""The WavFlow network, its presets and checkpoint helpers.

`wavflow.model.flow` (flow matching: time sampling, losses, samplers) is imported on its own.
"""

from wavflow.model.network import (
    NON_PERSISTENT_BUFFERS,
    Conditions,
    WavFlowNet,
    build_model,
    build_model_from_config,
)
from wavflow.model.presets import PRESETS, ModelPreset

__all__ = [
    "NON_PERSISTENT_BUFFERS",
    "PRESETS",
    "Conditions",
    "ModelPreset",
    "WavFlowNet",
    "build_model",
    "build_model_from_config",
]
