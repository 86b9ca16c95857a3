"""The run folder's checkpoints as every rank sees them: the one decision to resume or start
fresh (rank 0 decides, all follow), the check that every rank read the same checkpoint, and
writing full/EMA checkpoints (rank 0 writes, all ranks take part). What a checkpoint holds is
`TrainState.checkpoint_dict` (train_state.py); the files' layout is in checkpointing.py."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.distributed as dist

from wavflow.distributed import DistInfo, barrier
from wavflow.errors import CheckpointError, ConfigError, WavFlowError
from wavflow.io_utils import atomic_torch_save
from wavflow.model.checkpoint import load_weights
from wavflow.model.cond_norm import state_has_cond_norm
from wavflow.train.checkpointing import LATEST_NAME, capture_rng, ema_checkpoint_name, restore_rng
from wavflow.train.ema import ParamEMA
from wavflow.train.fsdp import full_parameters
from wavflow.train.run_dir import RunLock, remove_stale_temporaries


class RunFolder:
    """<training.output_dir>/<training.experiment_id>/ for one rank of a run."""

    def __init__(self, exp_dir: Path, info: DistInfo, logger: logging.Logger) -> None:
        self.exp_dir, self.info, self.logger = exp_dir, info, logger
        self.latest_path = exp_dir / LATEST_NAME

    def agree_on_start(self, resume: bool) -> bool:
        """Rank 0 takes the folder's lock, removes stale temporaries and decides between resume
        and a fresh start; every rank follows that one decision (never its own view of the disk)."""
        decision: dict[str, Any] = {}
        failure: WavFlowError | None = None
        if self.info.is_main:
            try:
                RunLock(self.exp_dir).acquire()  # held until run_training ends or the process dies
                for path in remove_stale_temporaries(self.exp_dir):
                    self.logger.warning("Removed %s, left by an interrupted checkpoint write", path)
                decision = {"resume": resume and self.latest_path.exists()}
            except WavFlowError as exc:
                failure, decision = exc, {"error": f"{type(exc).__name__}: {exc}"}
        if self.info.is_distributed:
            box = [decision]
            dist.broadcast_object_list(box, src=0)
            decision = box[0]
        if failure is not None:
            raise failure
        if "error" in decision:
            raise ConfigError(f"rank 0 stopped the run: {decision['error']}")
        return bool(decision["resume"])

    def check_same_resume_point(self, mine: Mapping[str, Any], failure: WavFlowError | None) -> None:
        """Every rank must have read the same checkpoint: `mine` is this rank's (global step,
        epoch, batch, weights digest) or {"error": ...}; `failure` what this rank raised."""
        if not self.info.is_distributed:
            if failure is not None:
                raise failure
            return
        gathered: list[Any] = [None] * self.info.world_size
        dist.all_gather_object(gathered, dict(mine))
        if failure is not None and self.info.is_main:
            raise failure
        if "error" in gathered[0]:
            raise CheckpointError(f"rank 0 could not load {self.latest_path}: {gathered[0]['error']}")
        for rank, got in enumerate(gathered):
            if got != gathered[0]:
                seen = got.get("error") or (
                    f"global step {got['global_step']}, epoch {got['epoch']}, batch {got['batch_in_epoch']}, "
                    f"weights sha1 {got['digest'][:12]}"
                )
                ref = gathered[0]
                raise CheckpointError(
                    f"rank {rank} does not see the checkpoint rank 0 resumes from ({self.latest_path}: rank 0 read "
                    f"global step {ref['global_step']}, weights sha1 {ref['digest'][:12]}; rank {rank}: {seen}). "
                    "training.output_dir must be on a file system shared by all nodes (see TRAINING.md)"
                )

    def gather_rng(self, generator: torch.Generator) -> list[Any]:
        """Every rank's RNG states (collective: all ranks call this together)."""
        mine = capture_rng(generator)
        if not self.info.is_distributed:
            return [mine]
        gathered: list[Any] = [None] * self.info.world_size
        dist.all_gather_object(gathered, mine)
        return gathered

    def save(self, names: Sequence[str], build: Callable[[list[Any]], dict[str, Any]], generator: torch.Generator,
             *, epoch: int, batch_in_epoch: int, global_step: int, collective: bool = False) -> None:
        """Write `build(every rank's RNG states)` under each name (rank 0; all ranks must call).
        `collective`: every rank builds (a sharded network gathers its tensors), rank 0 writes."""
        rng = self.gather_rng(generator)
        ckpt = build(rng) if self.info.is_main or collective else None
        if self.info.is_main:
            for name in names:
                path = atomic_torch_save(ckpt, self.exp_dir / name)
                # docs/method.md §8.5: the display epoch; mid-epoch saves name the epoch in progress
                display = epoch if batch_in_epoch == 0 else epoch + 1
                where = "" if batch_in_epoch == 0 else f", {batch_in_epoch} batch(es) into it"
                self.logger.info("Checkpoint saved to %s (epoch %d%s, global step %d)", path, display, where, global_step)
        barrier(self.info)

    def save_ema(self, ema_state: Mapping[str, torch.Tensor], epoch: int) -> None:
        """`ema_epoch_<epoch>.pth`: the flat EMA state dict (rank 0 only)."""
        if self.info.is_main:
            path = atomic_torch_save(dict(ema_state), self.exp_dir / ema_checkpoint_name(epoch))
            self.logger.info("Saved EMA checkpoint to %s", path)


def weights_digest(model: torch.nn.Module) -> str:
    """sha1 over the bytes of every parameter (bitwise identity check across ranks)."""
    h = hashlib.sha1()
    for _, p in full_parameters(model):  # a sharded network's whole tensors (collective)
        h.update(p.float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def weights_in_sync(info: DistInfo, model: torch.nn.Module, logger: logging.Logger) -> bool:
    """Log whether every rank holds bit-identical weights (collective under DDP)."""
    mine = weights_digest(model)
    digests = [mine]
    if info.is_distributed:
        digests = [None] * info.world_size  # type: ignore[list-item]
        dist.all_gather_object(digests, mine)
    same = len(set(digests)) == 1
    if info.is_main:
        if same:
            logger.info("Weights identical on all %d rank(s) (sha1 %s)", info.world_size, mine)
        else:
            logger.error("Weights differ across ranks: %s", digests)
    return same


def restore_weights(ckpt: Mapping[str, Any], model: Any, emas: Sequence[ParamEMA], *, source: str,
                    feature_norm_setting: Any) -> None:
    """The network and its EMAs from a full checkpoint (an EMA the file lacks restarts from
    the network). A run cannot switch feature normalisation on or off halfway."""
    has_norm, want_norm = state_has_cond_norm(ckpt["model"]), model.cond_norm is not None
    if has_norm != want_norm:
        raise ConfigError(
            f"{source} was trained {'with' if has_norm else 'without'} feature normalisation, but "
            f"data.feature_norm={feature_norm_setting} now resolves to {'on' if want_norm else 'off'}: "
            f"set data.feature_norm={str(has_norm).lower()} to continue it"
        )
    load_weights(model, ckpt["model"], source=source)  # the checkpoint's statistics win
    for ema, key in zip(emas, ("model_ema1", "model_ema2")):
        if key in ckpt:
            ema.load_state_dict(ckpt[key], source=f"{source} [{key}]")
        else:
            ema.reset_to(model)


def restore_rank_rng(rng: Any, generator: torch.Generator, *, info: DistInfo, reseed: int, source: str,
                     logger: logging.Logger) -> None:
    """This rank's RNG states from a checkpoint's per-rank list; where they cannot be restored
    (another world size, another kind of machine) the training generator is reseeded with
    `reseed` and the run says it is no longer bit-identical."""
    if isinstance(rng, list) and len(rng) == info.world_size:
        skipped = restore_rng(rng[info.rank], generator)
        if any(s.startswith("the training generator") for s in skipped):
            generator.manual_seed(reseed)
        if skipped and info.is_main:
            logger.warning(
                "%s comes from another kind of machine: not restored: %s; reseeded where needed. "
                "Training continues, but not bit-identically to an uninterrupted run", source, "; ".join(skipped),
            )
        return
    if rng is not None:
        logger.warning(
            "%s holds RNG states of %d ranks, this run has %d: reseeding (training continues, "
            "but not bit-identically)", source, len(rng), info.world_size,
        )
    generator.manual_seed(reseed)
