"""Shared pytest set-up: CPU only, few threads, a private weights cache per session."""

from __future__ import annotations

import os

import pytest
import torch

# One thread: on small tensors two threads on a shared 2-core box are 10x slower (measured).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def wavflow_cache_dir(tmp_path_factory: pytest.TempPathFactory):
    """A private $WAVFLOW_CACHE_DIR for the session (tiny encoder weights are written here)."""
    path = tmp_path_factory.mktemp("wavflow_cache")
    old = os.environ.get("WAVFLOW_CACHE_DIR")
    os.environ["WAVFLOW_CACHE_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("WAVFLOW_CACHE_DIR", None)
    else:
        os.environ["WAVFLOW_CACHE_DIR"] = old


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Every test runs with one intra-op thread, whatever an earlier test set."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
