"""Library calls leave process-wide settings as the caller set them (TF32 flags, logging)."""

from __future__ import annotations

import logging

import torch

from wavflow import generator as generator_mod
from wavflow import runtime
from wavflow.config import load_config


class _StubModel(torch.nn.Module):
    def to(self, *args, **kwargs):  # no CUDA here: stand in for a model moved to the GPU
        return self


def _tf32_flags() -> tuple[bool, bool]:
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def test_generator_on_cuda_scopes_tf32_to_its_calls(monkeypatch):
    old = _tf32_flags()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        monkeypatch.setattr(generator_mod, "resolve_device", lambda device: torch.device("cuda"))
        generator_mod.WavFlowGenerator(_StubModel(), load_config("infer.yaml"), device="cuda")
        assert _tf32_flags() == (False, False)  # creating a generator changes nothing
        # its calls run with TF32, like the reference: fp32 here, so no autocast needs a GPU
        with runtime.autocast_context(torch.device("cuda"), "fp32", tf32=True):
            assert _tf32_flags() == (True, True)
        assert _tf32_flags() == (False, False)
        with runtime.autocast_context(torch.device("cuda"), "fp32"):  # training keeps the process's flags
            assert _tf32_flags() == (False, False)
        with runtime.tf32_scope(torch.device("cpu")):
            assert _tf32_flags() == (False, False)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def test_tiny_encoder_build_keeps_the_callers_logging_disable(tmp_path):
    from wavflow.features.encoders import ensure_tiny_clip

    previous = logging.root.manager.disable
    logging.disable(logging.INFO)
    try:
        ensure_tiny_clip(tmp_path)
        assert logging.root.manager.disable == logging.INFO
    finally:
        logging.disable(previous)
