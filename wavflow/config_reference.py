"""The reference implementation's config keys, accepted as they are (docs/method.md §8.1).

People arrive with the reference's YAML files (`_base_: base.yaml` chains) and command lines.
Its keys that have a counterpart here are renamed to it; the keys its typed config declares but
never reads are dropped. Each is logged once per process, so nothing is silently lost.
"""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger("wavflow.config")

# Reference key -> this project's key, by job ("*": every job that has the target key).
RENAMED: dict[str, dict[str, str]] = {
    "train": {
        "data.csv_path": "data.train_csv",
        "experiment_id": "training.experiment_id",
        "model.empty_string_ckpt": "model.empty_string_feat_path",
        "training.lr_schedule_steps": "training.steps",
        "training.lr_schedule_gamma": "training.gamma",
    },
    "*": {
        "model.clip_model_name": "encoders.clip_model",
        "model.clip_pretrained": "encoders.clip_pretrained",
        "model.synchformer_ckpt": "encoders.synchformer_ckpt",
        "inference.duration_sec": "data.audio_duration",
        "extraction.target_sample_rate": "data.target_sample_rate",
    },
}

# Reference keys with no counterpart here, and why nothing is lost by dropping them.
_NO_COUNTERPART: dict[str, str] = {
    "training.start_epoch": "the epoch is restored from checkpoint_latest.pth",
    "training.dataloader_pin_memory": "pinned memory is used whenever training runs on CUDA",
    "training.dataloader_prefetch_factor": "the DataLoader default is used",
    "comm.init_timeout_seconds": "the process-group timeout is fixed (wavflow/distributed.py)",
    "extraction.seed": "extraction draws no random numbers",
    "model.empty_string_ckpt": "only training reads an empty-string feature; checkpoints carry theirs",
}

# Declared in the reference's typed config but never read by it (docs/method.md §9).
_UNUSED_PREFIXES = ("parallelism.", "metrics.")
_UNUSED_KEYS = frozenset(
    {
        "comm.train_timeout_seconds",
        *(f"checkpoint.{k}" for k in ("enable_checkpoint", "folder", "interval", "keep_latest_k", "load_step", "export_dtype")),
        *(f"eval.{k}" for k in ("interval_min", "interval_max", "eval_freq", "sampling_method", "num_sampling_steps")),
        "training.global_batch_size",
        "model.attn_dropout",
        "model.proj_dropout",
        "model.class_num",
    }
)

# Jobs that read reference files; the evaluate job has a `metrics` block of its own.
REFERENCE_JOBS = frozenset({"base", "train", "infer", "extract_t2a", "extract_vt2a"})

_reported: set[str] = set()


def _report(message: str) -> None:
    """Log `message` once per process (rank 0 only under torchrun)."""
    if message in _reported or os.environ.get("RANK", "0") != "0":
        return
    _reported.add(message)
    log.warning(message)


def rename(job: str, key: str) -> str | None:
    """This project's key for reference `key` (logged), None to drop it (logged), else `key`."""
    if job not in REFERENCE_JOBS:
        return key
    table = {**RENAMED["*"], **RENAMED.get(job, {})}
    if key in table:
        _report(f"reference key {key} -> {table[key]}")
        return table[key]
    if key in _NO_COUNTERPART:
        _report(f"reference key {key} ignored: {_NO_COUNTERPART[key]}")
        return None
    if key in _UNUSED_KEYS or f"{key}.".startswith(_UNUSED_PREFIXES):
        shown = key if key in _UNUSED_KEYS or "." in key.rstrip(".") else f"{key}.*"
        _report(f"reference key {shown} ignored: the reference declares it but never reads it")
        return None
    return key


def map_tree(job: str, tree: dict[str, Any]) -> dict[str, Any]:
    """A plain config tree with the reference's keys renamed or dropped (see `rename`)."""
    if job not in REFERENCE_JOBS:
        return tree
    out: dict[str, Any] = {}
    for key, value in _leaves(tree):
        target = rename(job, key)
        if target is not None:
            _set(out, target, value)
    return out


def _leaves(tree: dict[str, Any], prefix: str = ""):
    """Dotted (key, value) pairs; dict values are descended, except empty ones."""
    for key, value in tree.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict) and value and not _is_reference_block(full):
            yield from _leaves(value, f"{full}.")
        else:
            yield full, value


def _is_reference_block(key: str) -> bool:
    # a whole ignored block (parallelism: {...}) is reported once, not key by key
    return f"{key}." in _UNUSED_PREFIXES


def _set(tree: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[leaf] = value
