"""What each rank reads in an epoch: the sampler that continues an epoch exactly where a
checkpoint stopped it, and the DataLoader built the same way every epoch."""

from __future__ import annotations

import functools
import logging
import math
import random
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset, Sampler

from wavflow.distributed import DistInfo
from wavflow.row_policy import RowFailures, max_failed_fraction
from wavflow.train.dataset import (
    FeatureShapes,
    TrainDataset,
    TrainRow,
    collate_train,
    csv_list,
    read_train_csvs,
    select_rows,
)
from wavflow.train.feature_checks import check_feature_files, PassedFiles

log = logging.getLogger("wavflow.train")


class RestOfEpochSampler(Sampler):
    """This rank's share of an epoch's global sample order after its first `consumed` samples.

    The global order is DistributedSampler's (shuffle=True, drop_last=False): `randperm(n)`
    seeded with `seed + epoch`, padded by repeating its start to a multiple of the world size.
    Its rest is dealt round-robin to this run's ranks, so a mid-epoch resume continues at the
    exact sample where the checkpoint was written, whatever the world size was then. With an
    unchanged world size it yields exactly what DistributedSampler would still have yielded.
    """

    def __init__(self, n: int, *, epoch: int, consumed: int, rank: int, world_size: int, seed: int = 0) -> None:
        self.n, self.epoch, self.consumed = n, epoch, consumed
        self.rank, self.world_size, self.seed = rank, world_size, seed

    def _indices(self) -> list[int]:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        rest = perm[self.consumed:]
        pad = (-len(rest)) % self.world_size if rest else 0
        if pad:
            rest += (perm * math.ceil(pad / len(perm)))[:pad]  # DistributedSampler's wrap-around
        return rest[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices())

    def __len__(self) -> int:
        rest = max(0, self.n - self.consumed)
        return math.ceil(rest / self.world_size)


class LiveEpochOrder(Sampler):
    """The order of whichever epoch it was last pointed at (`point_at`): one sampler for a
    DataLoader whose workers persist across epochs. Its indices are drawn in the main process
    when an epoch starts, so pointing it at the next epoch (or at the rest of a resumed one) is
    all a reused DataLoader needs; it yields what RestOfEpochSampler would."""

    def __init__(self, n: int, *, rank: int, world_size: int, seed: int = 0) -> None:
        self.current = RestOfEpochSampler(n, epoch=0, consumed=0, rank=rank, world_size=world_size, seed=seed)

    def point_at(self, epoch: int, consumed: int) -> None:
        self.current.epoch, self.current.consumed = epoch, consumed

    def __iter__(self) -> Iterator[int]:
        return iter(self.current)

    def __len__(self) -> int:
        return len(self.current)


def _seed_worker(base_seed: int, worker_id: int) -> None:
    seed = (base_seed + worker_id) % 2**32
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def epoch_loader(dataset: Dataset, sampler: Sampler | Sequence[int], *, batch_size: int, num_workers: int,
                 seed: int, rank: int, epoch: int, pin_memory: bool, persistent_workers: bool = False) -> DataLoader:
    """The DataLoader of one epoch: its workers and its shuffling generator are seeded from
    (seed, rank, epoch), so a resumed run draws what an uninterrupted one would.
    `persistent_workers` (with workers): the workers outlive the epoch and keep the seeds of the
    epoch they started in; the training rows are read without randomness, so the batches are
    the same."""
    base_seed = (seed * 1_000 + rank * 100_003 + epoch * 7) % 2**62
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate_train,
        num_workers=num_workers,
        worker_init_fn=functools.partial(_seed_worker, base_seed) if num_workers else None,
        generator=torch.Generator().manual_seed(base_seed),
        pin_memory=pin_memory,
        drop_last=False,
        persistent_workers=bool(persistent_workers and num_workers),
    )


def prepare_rows(data: DictConfig, info: DistInfo, checks_path: Optional[Path] = None) -> list[TrainRow]:
    """The rows this run trains on: every training CSV read and checked (feature files checked
    split over the ranks, the verdicts shared), bad rows skipped or fatal per data.on_bad_row
    within data.max_failed_fraction. The same list on every rank. `checks_path` (the run
    folder's feature_checks.json): feature files that passed there and have not changed since
    are not read again, and rank 0 records this start's passes there."""
    rows, reports = read_train_csvs(csv_list(data.train_csv), data.data_root)
    problems: dict[int, str] = {}
    if bool(data.validate_features):
        shapes = FeatureShapes.from_data_config(data)
        known = PassedFiles.load(checks_path, shapes)
        mine = list(range(info.rank, len(rows), info.world_size))
        local, passed, skipped = check_feature_files([rows[i] for i in mine], shapes, known,
                                                     show_progress=info.is_main)
        part = ({mine[pos]: reason for pos, reason in local.items()}, passed, skipped)
        parts: list[Any] = [part]
        if info.is_distributed:
            parts = [None] * info.world_size
            dist.all_gather_object(parts, part)
        record = PassedFiles(shapes)
        for found, stamps, _ in parts:
            problems.update(found)
            record.stamps.update(stamps)
        if info.is_main:
            reused = sum(skipped_on_rank for _, _, skipped_on_rank in parts)
            if reused:
                log.info("data.validate_features: the feature files of %d of %d rows are unchanged since they passed "
                         "(%s) and were not read again", reused, len(rows), checks_path)
            if checks_path is not None:
                record.save(checks_path)
    return select_rows(rows, reports, problems, str(data.on_bad_row), max_failed_fraction(data.max_failed_fraction))


def gather_failures(info: DistInfo, failures: RowFailures) -> RowFailures:
    """Every rank's read failures in one (counts summed; the first few of rank 0, then rank 1,
    ...). Collective: all ranks call it together."""
    if not info.is_distributed:
        return failures
    parts: list[Any] = [None] * info.world_size
    dist.all_gather_object(parts, (failures.count, failures.first))
    merged = RowFailures()
    for count, first in parts:
        merged.merge(RowFailures(count=int(count), first=list(first)))
    return merged


def placeholder_batch(dataset: TrainDataset) -> dict[str, Any]:
    """One zero row standing in for a batch whose rows all failed to read, so every rank still
    runs the same collective forward/backward (the step multiplies its loss by 0)."""
    shapes = dataset.shapes
    return {
        "audio_tokens": torch.zeros(1, dataset.num_tokens, dataset.audio_dim),
        "clip_features": torch.zeros(1, *shapes.clip),
        "sync_features": torch.zeros(1, *shapes.sync),
        "text_features": torch.zeros(1, *shapes.text),
        "video_exist": torch.zeros(1, dtype=torch.bool),
        "text_exist": torch.zeros(1, dtype=torch.bool),
        **({"loudness_lufs": torch.full((1,), float("nan"))} if dataset.measure_loudness else {}),
    }
