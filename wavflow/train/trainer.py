"""The training loop (docs/method.md §8): DDP, AdamW, EMA, exact resume, samples, logging.

`run_training(cfg)` works as a plain process (world size 1) and under torchrun. Everything
random in the optimisation comes from one generator per process, seeded with
`training.seed + global rank`; its state (and the global RNGs) is saved per rank in every
checkpoint, together with the position inside the epoch, so a stopped run resumes to the
same weights as an uninterrupted one (bit-identical on CPU fp32).
"""

from __future__ import annotations

import functools
import hashlib
import math
import random
import signal
import threading
import time
import warnings
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Sampler
from tqdm import tqdm

from wavflow.config import save_config
from wavflow.distributed import DistInfo, all_reduce_sum, barrier, cleanup, init_distributed
from wavflow.errors import CheckpointError, ConfigError, FeatureError, ManifestError, WavFlowError
from wavflow.io_utils import atomic_torch_save, check_safe_id, safe_torch_load
from wavflow.row_policy import POLICY_KEY, RowFailures, check_rows, max_failed_fraction, policy_broken
from wavflow.features.report import identity_tag
from wavflow.model import build_model_from_config
from wavflow.model.checkpoint import load_weights, resolve_checkpoint_path
from wavflow.model.cond_norm import state_has_cond_norm
from wavflow.speed import (
    SpeedOptions, combined, make_adamw, resolve_optimizer_impl, sdpa_context, set_conv_impl, with_kernel_flags_of,
)
from wavflow.train.feature_norm import resolve_feature_norm
from wavflow.train.checkpointing import (
    CHECKPOINT_FORMAT,
    LATEST_NAME,
    capture_rng,
    ema_checkpoint_name,
    epoch_checkpoint_name,
    load_initial_checkpoint,
    load_latest_checkpoint,
    model_state_cpu,
    restore_rng,
)
from wavflow.train.dataset import (
    FeatureShapes,
    TrainDataset,
    TrainRow,
    collate_train,
    csv_list,
    find_feature_problems,
    read_train_csvs,
    select_rows,
    warn_if_audio_short,
)
from wavflow.train.ema import ParamEMA
from wavflow.train.logging_utils import TensorBoard, close_logging, setup_logging
from wavflow.train.lr_schedule import SCHEDULES, apply_lr, base_lr, lr_at
from wavflow.train.run_dir import RunLock, release_run_locks, remove_stale_temporaries
from wavflow.train.samples import generate_training_sample
from wavflow.train.step import (
    StepNoise,
    apply_label_drop,
    draw_step_noise,
    fill_missing_modalities,
    flow_matching_loss,
)

T_BUCKETS = 4  # loss is also logged per t_s quarter
MAX_SAMPLE_RANKS = 8


@dataclass
class TrainResult:
    exp_dir: Path
    epoch: int  # completed epochs
    global_step: int
    stopped_early: bool  # a signal or training.max_steps ended the run
    skipped_rows: int  # rows that failed at read time (all ranks, all epochs of this run)


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


def _seed_worker(base_seed: int, worker_id: int) -> None:
    seed = (base_seed + worker_id) % 2**32
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _int_key(tr: DictConfig, key: str, minimum: int, *, nullable: bool = False) -> int | None:
    """training.<key> as an int >= minimum (ConfigError naming the key otherwise)."""
    value = tr[key]
    if value is None and nullable:
        return None
    ok = isinstance(value, int) and not isinstance(value, bool)
    if isinstance(value, str):  # OmegaConf keeps quoted/odd CLI values as strings
        ok = value.strip().lstrip("-").isdigit()
        value = int(value) if ok else value
    if not ok or value < minimum:  # type: ignore[operator]
        null = "null or " if nullable else ""
        raise ConfigError(f"training.{key} must be {null}an integer >= {minimum}, got {tr[key]!r}")
    return int(value)  # type: ignore[arg-type]


def _float_key(tr: DictConfig, key: str) -> float:
    try:
        if isinstance(tr[key], bool):
            raise TypeError
        return float(tr[key])
    except (TypeError, ValueError):
        raise ConfigError(f"training.{key} must be a number, got {tr[key]!r}") from None


def check_experiment_id(value: Any) -> str:
    """A non-empty name usable as one folder inside training.output_dir."""
    text = "" if value is None else str(value)
    try:
        check_safe_id(text, where="training.experiment_id")
    except ManifestError as exc:
        raise ConfigError(
            f"training.experiment_id={value!r} must be a non-empty folder name without '/', '\\' or '..' "
            f"(outputs go to <training.output_dir>/<training.experiment_id>/): {exc}"
        ) from None
    return text


def _check_training_config(cfg: DictConfig) -> None:
    tr = cfg.training
    if tr.precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"training.precision={tr.precision!r} is not one of auto, fp32, bf16")
    if tr.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"training.device={tr.device!r} is not one of auto, cpu, cuda")
    if tr.lr_schedule not in SCHEDULES:
        raise ConfigError(f"training.lr_schedule={tr.lr_schedule!r} is not one of {', '.join(SCHEDULES)}")
    if tr.loss_type not in ("x", "v"):
        raise ConfigError(f"training.loss_type={tr.loss_type!r} is not one of x, v")
    for key in ("batch_size", "grad_accum_steps", "epochs", "repeat_factor", "log_freq"):
        _int_key(tr, key, 1)
    _int_key(tr, "max_steps", 1, nullable=True)
    for key in ("num_workers", "warmup_steps", "gen_train_freq", "checkpoint_freq", "checkpoint_save_epoch",
                "ema_checkpoint_save_epoch", "save_every_steps", "seed", "max_nonfinite_steps"):
        _int_key(tr, key, 0)
    for key in ("label_drop_prob", "video_drop_prob", "text_drop_prob"):
        if key != "label_drop_prob" and tr[key] is None:
            continue  # null: label_drop_prob
        if not 0.0 <= _float_key(tr, key) <= 1.0:
            raise ConfigError(f"training.{key} must lie in [0, 1], got {tr[key]}")
    if not 0.0 <= float(cfg.sampling.uniform_frac) <= 1.0:
        raise ConfigError(f"sampling.uniform_frac must lie in [0, 1], got {cfg.sampling.uniform_frac}")
    for key in ("ema_decay1", "ema_decay2"):
        if not 0.0 <= _float_key(tr, key) < 1.0:
            raise ConfigError(f"training.{key} must lie in [0, 1), got {tr[key]}")
    for key in ("min_lr", "weight_decay", "clip_grad_norm", "gamma"):
        _float_key(tr, key)
    max_failed_fraction(OmegaConf.select(cfg, POLICY_KEY, default=None))
    if tr.lr is None and tr.blr is None:
        raise ConfigError("set training.lr or training.blr")
    if tr.lr is not None and _float_key(tr, "lr") <= 0:
        raise ConfigError(f"training.lr must be > 0 (or null to use training.blr), got {tr.lr}")
    check_experiment_id(tr.experiment_id)
    SpeedOptions.from_config(tr, "training")


REFERENCE_PRESET_PREFIXES = ("medium_", "large_")


def cpu_reference_preset_warning(model_name: str, device: torch.device) -> str | None:
    """The start-up warning for a reference-size preset trained on CPU, or None."""
    if device.type != "cpu" or not str(model_name).startswith(REFERENCE_PRESET_PREFIXES):
        return None
    size = "624 M" if str(model_name).startswith("medium_") else "1032 M"
    return (
        f"model.name={model_name} is a reference preset: {size} parameters on CPU: ~minutes per step and "
        ">20 GB RAM; use model.name=small_16k/tiny_16k for CPU runs"
    )


def _autocast(device: torch.device, precision: str, attention_backend: str = "auto") -> AbstractContextManager:
    """The forward context: bf16 autocast per training.precision, plus the SDPA backend."""
    ctx: AbstractContextManager = nullcontext()
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        ctx = torch.autocast(device.type, dtype=torch.bfloat16)
    if attention_backend == "auto":
        return ctx
    return combined(ctx, sdpa_context(attention_backend))


def drop_probs(tr: DictConfig) -> tuple[float, float]:
    """(video, text) drop probabilities: `training.video_drop_prob` / `text_drop_prob`, each
    defaulting to `training.label_drop_prob` (the reference's one rate for both)."""
    base = float(tr.label_drop_prob)
    video, text = tr.get("video_drop_prob"), tr.get("text_drop_prob")
    return (base if video is None else float(video)), (base if text is None else float(text))


def load_empty_string_feat(path: Path, shape: tuple[int, int], what: str) -> torch.Tensor:
    feat = safe_torch_load(path, what=what)
    if not isinstance(feat, torch.Tensor):
        raise FeatureError(f"{what} {path} does not hold a tensor")
    if feat.dim() == 3 and feat.shape[0] == 1:
        feat = feat[0]
    if tuple(feat.shape) != shape or not feat.is_floating_point():
        raise FeatureError(f"{what} {path} has shape {tuple(feat.shape)} ({feat.dtype}), expected a float {shape}")
    return feat.float()


def resolve_empty_string_feat(cfg: DictConfig, first_row: TrainRow) -> tuple[torch.Tensor, str]:
    """The learned empty-caption feature and where it came from (see configs/train.yaml)."""
    shape = FeatureShapes.from_data_config(cfg.data).text
    if cfg.model.empty_string_feat_path:
        path = Path(str(cfg.model.empty_string_feat_path)).expanduser()
        return load_empty_string_feat(path, shape, "model.empty_string_feat_path"), str(path)
    beside = first_row.features_path.parent / "empty_string.pt"
    if beside.is_file():
        return load_empty_string_feat(beside, shape, "empty string feature"), str(beside)
    from wavflow.features.encoders import FeatureEncoders

    encoders = FeatureEncoders.from_config(cfg.encoders, need_video=False)
    feat = encoders.empty_string_feature().detach().float().cpu()
    if feat.dim() == 3 and feat.shape[0] == 1:
        feat = feat[0]
    if tuple(feat.shape) != shape:
        raise FeatureError(
            f"the text encoder (encoders.profile={cfg.encoders.profile}) gives an empty-string feature of shape "
            f"{tuple(feat.shape)}, but data.text_seq_len/text_dim ask for {shape}"
        )
    return feat, f"computed by the text encoder (encoders.profile={cfg.encoders.profile}; no {beside})"


def optimizer_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """no_decay (1-D, '.bias', 'diffloss') first, then decay; frozen parameters left out."""
    no_decay, decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim == 1 or name.endswith(".bias") or "diffloss" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": float(weight_decay)}]


class Trainer:
    def __init__(self, cfg: DictConfig, info: DistInfo | None = None) -> None:
        _check_training_config(cfg)
        self.cfg = cfg
        tr = cfg.training
        self.tr = tr
        self.info = info or init_distributed(str(tr.device))
        self.rank, self.world_size = self.info.rank, self.info.world_size
        self.is_main = self.info.is_main
        self.device = self.info.device
        self.exp_dir = Path(str(tr.output_dir)).expanduser().absolute() / str(tr.experiment_id)
        self.logger = setup_logging(self.exp_dir, self.is_main, self.rank)
        self.speed = SpeedOptions.from_config(tr, "training")
        self.autocast_factory = functools.partial(
            _autocast, self.device, str(tr.precision), self.speed.attention_backend
        )
        self.seed = int(tr.seed)
        self.accum = int(tr.grad_accum_steps)
        cpu_warning = cpu_reference_preset_warning(str(cfg.model.name), self.device)
        if cpu_warning and self.is_main:
            self.logger.warning(cpu_warning)
        self.latest_path = self.exp_dir / LATEST_NAME
        resuming = self._agree_on_start()

        rows = self._prepare_rows()
        if self.is_main:
            warn_if_audio_short(rows, float(cfg.data.audio_duration))
        self.dataset = TrainDataset(rows, cfg.data, repeat_factor=int(tr.repeat_factor))
        self.sampler = DistributedSampler(
            self.dataset, num_replicas=self.world_size, rank=self.rank, shuffle=True, drop_last=False, seed=0
        )

        # Same initial weights on every rank (DDP also broadcasts rank 0's at wrap time).
        torch.manual_seed(self.seed)
        empty_string = None
        if not resuming:  # a resumed checkpoint carries its own copy
            empty_string, source = resolve_empty_string_feat(cfg, rows[0])
            self.logger.info("Empty string feature: %s", source)
        self.model = build_model_from_config(
            cfg, empty_string_feat=empty_string, gradient_checkpointing=bool(tr.gradient_checkpointing)
        ).to(self.device)
        norm_stats, norm_why = resolve_feature_norm(cfg.data.feature_norm, [r.features_path.parent for r in rows])
        self.logger.info("Feature normalisation: %s", norm_why)
        if norm_stats is not None:  # before the optimizer and EMAs: its frozen parameters are saved with both
            self.model.attach_condition_norm().set_statistics(
                norm_stats.streams, identity_tag(norm_stats.encoder_identity),
                rms=OmegaConf.to_container(cfg.data.feature_norm_rms))
            # the empty clip/sync tokens start at zero: at the streams' means (cond_norm.py)
        self.model.train()
        set_conv_impl(self.model, self.speed.conv_impl)
        self.optimizer = make_adamw(
            optimizer_groups(self.model, float(tr.weight_decay)),
            resolve_optimizer_impl(self.speed.optimizer_impl, self.device), lr=1e-3, betas=(0.9, 0.95),
        )
        self.eff_batch = int(tr.batch_size) * self.world_size * self.accum
        self.lr_base = base_lr(tr.lr, float(tr.blr), self.eff_batch)
        self.last_lr = self.lr_base
        foreach_ema = self.speed.ema_impl == "foreach"
        self.ema1 = ParamEMA(self.model, float(tr.ema_decay1), bool(tr.ema_warmup), foreach=foreach_ema)
        self.ema2 = ParamEMA(self.model, float(tr.ema_decay2), bool(tr.ema_warmup), foreach=foreach_ema)

        # Per-process randomness: the training generator and the globals, per GLOBAL rank.
        self.generator = torch.Generator(self.device).manual_seed(self.seed + self.rank)
        random.seed(self.seed + self.rank)
        np.random.seed((self.seed + self.rank) % 2**32)
        torch.manual_seed(self.seed + self.rank)

        self.epoch = 0  # completed epochs = the epoch in progress
        self.global_step = 0
        self.batch_in_epoch = 0  # micro-batches of the current epoch already trained (this rank)
        self.samples_in_epoch = 0  # samples of the epoch's global order already trained (all ranks)
        self._load_start_state(resuming)

        if self.info.is_distributed:
            with warnings.catch_warnings():  # broadcast_buffers=False is still the way to keep rot tables local
                warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
                self.ddp_model: nn.Module = DistributedDataParallel(
                    self.model,
                    device_ids=[self.device.index] if self.device.type == "cuda" else None,
                    broadcast_buffers=False,
                )
        else:
            self.ddp_model = self.model
        self.forward_model: nn.Module = torch.compile(self.ddp_model) if bool(tr.compile) else self.ddp_model

        self.tb = TensorBoard(self.exp_dir / "tensorboard", enabled=self.is_main and bool(tr.tensorboard))
        if self.is_main:
            save_config(cfg, self.exp_dir / "config.yaml")
            n_train = sum(p.numel() for p in self.model.parameters() if p.requires_grad) / 1e6
            self.logger.info("Number of trainable parameters: %.6fM", n_train)
            self.logger.info("Base lr: %s", "from training.lr" if tr.lr is not None else f"{float(tr.blr):.2e}")
            self.logger.info("Actual lr: %.2e", self.lr_base)
            self.logger.info("Effective batch size: %d", self.eff_batch)
            self.logger.info(
                "World size %d, device %s, precision %s, %d training rows (x%d repeat)",
                self.world_size, self.device, tr.precision, len(rows), int(tr.repeat_factor),
            )
        self._stop_signal: int | None = None
        self._old_handlers: dict[int, Any] = {}
        self.last_batch: dict[str, Any] | None = None
        self.skipped_rows = 0
        self.row_limit = max_failed_fraction(cfg.data.max_failed_fraction)
        self.nonfinite_in_a_row = 0  # optimiser steps skipped for a non-finite gradient norm

    # ------------------------------------------------------------------- start-up agreement
    def _agree_on_start(self) -> bool:
        """Rank 0 takes the folder's lock, removes stale temporaries and decides between resume
        and a fresh start; every rank follows that one decision (never its own view of the disk)."""
        decision: dict[str, Any] = {}
        failure: WavFlowError | None = None
        if self.is_main:
            try:
                RunLock(self.exp_dir).acquire()  # held until run_training ends or the process dies
                for path in remove_stale_temporaries(self.exp_dir):
                    self.logger.warning("Removed %s, left by an interrupted checkpoint write", path)
                decision = {"resume": bool(self.tr.resume) and self.latest_path.exists()}
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

    def _check_same_resume_point(self, mine: dict[str, Any], failure: WavFlowError | None) -> None:
        """Every rank must have read the same checkpoint (step, position, weights digest)."""
        if not self.info.is_distributed:
            if failure is not None:
                raise failure
            return
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, mine)
        if failure is not None and self.is_main:
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

    # ------------------------------------------------------------------------------ data
    def _prepare_rows(self) -> list[TrainRow]:
        data = self.cfg.data
        rows, reports = read_train_csvs(csv_list(data.train_csv), data.data_root)
        problems: dict[int, str] = {}
        if bool(data.validate_features):
            shapes = FeatureShapes.from_data_config(data)
            mine = list(range(self.rank, len(rows), self.world_size))
            local = find_feature_problems([rows[i] for i in mine], shapes, show_progress=self.is_main)
            found = {mine[pos]: reason for pos, reason in local.items()}
            if self.info.is_distributed:
                gathered: list[Any] = [None] * self.world_size
                dist.all_gather_object(gathered, found)
                for part in gathered:
                    problems.update(part)
            else:
                problems = found
        return select_rows(rows, reports, problems, str(data.on_bad_row), max_failed_fraction(data.max_failed_fraction))

    def _rest_of_epoch(self, epoch: int) -> RestOfEpochSampler:
        return RestOfEpochSampler(len(self.dataset), epoch=epoch, consumed=self.samples_in_epoch,
                                  rank=self.rank, world_size=self.world_size, seed=self.sampler.seed)

    def _epoch_loader(self, epoch: int, sampler: Sampler | Sequence[int] | None = None) -> DataLoader:
        """The DataLoader of `epoch` (workers, seeds, collate as training uses them); `sampler`
        replaces the epoch's order (scripts/bench/bench_model.py reads a longer stream)."""
        self.sampler.set_epoch(epoch)
        if sampler is None:
            sampler = self._rest_of_epoch(epoch) if self.samples_in_epoch else self.sampler
        base_seed = (self.seed * 1_000 + self.rank * 100_003 + epoch * 7) % 2**62
        workers = int(self.tr.num_workers)
        return DataLoader(
            self.dataset,
            batch_size=int(self.tr.batch_size),
            sampler=sampler,
            collate_fn=collate_train,
            num_workers=workers,
            worker_init_fn=functools.partial(_seed_worker, base_seed) if workers else None,
            generator=torch.Generator().manual_seed(base_seed),
            pin_memory=self.device.type == "cuda",
            drop_last=False,
        )

    def num_batches(self) -> int:
        return math.ceil(len(self.sampler) / int(self.tr.batch_size))

    # -------------------------------------------------------------------- checkpoints
    def _load_start_state(self, resuming: bool) -> None:
        ck = self.cfg.checkpoint
        if resuming:
            failure: WavFlowError | None = None
            try:
                ckpt = load_latest_checkpoint(self.latest_path)
                self._load_full(ckpt, model_only=False, source=str(self.latest_path))
                mine: dict[str, Any] = {
                    "global_step": self.global_step, "epoch": self.epoch,
                    "batch_in_epoch": self.batch_in_epoch, "digest": self.weights_digest(),
                }
            except WavFlowError as exc:
                failure, mine = exc, {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}
            self._check_same_resume_point(mine, failure)
            self.logger.info(
                "Resumed from %s: %d completed epoch(s), global step %d, batch %d of epoch %d",
                self.latest_path, self.epoch, self.global_step, self.batch_in_epoch, self.epoch + 1,
            )
            return
        if self.latest_path.exists():
            self.logger.warning("training.resume=false: ignoring (and later overwriting) %s", self.latest_path)
        if ck.initial_load_path:
            path = resolve_checkpoint_path(str(ck.initial_load_path), key="checkpoint.initial_load_path")
            if not path.is_file():
                raise CheckpointError(f"checkpoint.initial_load_path {path} does not exist")
            ckpt = load_initial_checkpoint(path)
            if "model" in ckpt:
                self._load_full(ckpt, model_only=bool(ck.initial_load_model_only), source=str(path))
            else:
                load_weights(self.model, ckpt, source=str(path))
                self.ema1.reset_to(self.model)
                self.ema2.reset_to(self.model)
            self.logger.info(
                "Loaded initial weights from %s (%d completed epoch(s), global step %d)", path, self.epoch, self.global_step
            )

    def _load_full(self, ckpt: dict[str, Any], *, model_only: bool, source: str) -> None:
        has_norm, want_norm = state_has_cond_norm(ckpt["model"]), self.model.cond_norm is not None
        if has_norm != want_norm:
            raise ConfigError(
                f"{source} was trained {'with' if has_norm else 'without'} feature normalisation, but "
                f"data.feature_norm={self.cfg.data.feature_norm} now resolves to {'on' if want_norm else 'off'}: "
                f"set data.feature_norm={str(has_norm).lower()} to continue it"
            )
        load_weights(self.model, ckpt["model"], source=source)  # the checkpoint's statistics win
        for ema, key in ((self.ema1, "model_ema1"), (self.ema2, "model_ema2")):
            if key in ckpt:
                ema.load_state_dict(ckpt[key], source=f"{source} [{key}]")
            else:
                ema.reset_to(self.model)
        if model_only or "optimizer" not in ckpt or "epoch" not in ckpt:
            return
        try:
            self.optimizer.load_state_dict(with_kernel_flags_of(self.optimizer, ckpt["optimizer"]))
        except Exception as exc:
            raise CheckpointError(f"optimizer state in {source} does not fit this model: {exc}") from exc
        self.epoch = int(ckpt["epoch"])
        self.global_step = int(ckpt.get("global_step", 0))
        self.batch_in_epoch = int(ckpt.get("batch_in_epoch", 0))
        saved_world = int(ckpt.get("world_size", self.world_size))
        # Older checkpoints: every rank had trained batch_in_epoch full batches.
        self.samples_in_epoch = int(ckpt.get(
            "samples_in_epoch", self.batch_in_epoch * int(self.tr.batch_size) * saved_world))
        if self.samples_in_epoch and saved_world != self.world_size and self.is_main:
            self.logger.warning(
                "%s stopped mid-epoch after %d sample(s) of epoch %d on %d rank(s); this run (%d rank(s)) "
                "trains the epoch's remaining samples in the same global order, none repeated or skipped",
                source, self.samples_in_epoch, self.epoch + 1, saved_world, self.world_size,
            )
        rng = ckpt.get("rng")
        if isinstance(rng, list) and len(rng) == self.world_size:
            skipped = restore_rng(rng[self.rank], self.generator)
            if any(s.startswith("the training generator") for s in skipped):
                self.generator.manual_seed(self.seed + self.rank + 1_000_003 * self.global_step)
            if skipped and self.is_main:
                self.logger.warning(
                    "%s comes from another kind of machine: not restored: %s; reseeded where needed. "
                    "Training continues, but not bit-identically to an uninterrupted run", source, "; ".join(skipped),
                )
        else:
            if rng is not None:
                self.logger.warning(
                    "%s holds RNG states of %d ranks, this run has %d: reseeding (training continues, "
                    "but not bit-identically)", source, len(rng), self.world_size,
                )
            self.generator.manual_seed(self.seed + self.rank + 1_000_003 * self.global_step)

    def checkpoint_dict(self, rng_states: list[Any]) -> dict[str, Any]:
        return {
            "model": model_state_cpu(self.model),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch,
            "global_step": self.global_step,
            "model_ema1": self.ema1.state_dict(),
            "model_ema2": self.ema2.state_dict(),
            "batch_in_epoch": self.batch_in_epoch,
            "samples_in_epoch": self.samples_in_epoch,
            "sampler_epoch": self.epoch,
            "rng": rng_states,
            "lr": {"base": float(self.lr_base), "last": float(self.last_lr)},
            "world_size": self.world_size,
            "config": OmegaConf.to_yaml(self.cfg, resolve=True),
            "format": CHECKPOINT_FORMAT,
        }

    def _gather_rng(self) -> list[Any]:
        """Every rank's RNG states (collective: all ranks call this together)."""
        mine = capture_rng(self.generator)
        if not self.info.is_distributed:
            return [mine]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, mine)
        return gathered

    def save_checkpoints(self, names: Sequence[str]) -> None:
        """Write the full checkpoint under each name (rank 0; all ranks must call)."""
        rng = self._gather_rng()
        if self.is_main:
            ckpt = self.checkpoint_dict(rng)
            for name in names:
                path = atomic_torch_save(ckpt, self.exp_dir / name)
                # docs/method.md §8.5: the display epoch; mid-epoch saves name the epoch in progress
                display = self.epoch if self.batch_in_epoch == 0 else self.epoch + 1
                where = "" if self.batch_in_epoch == 0 else f", {self.batch_in_epoch} batch(es) into it"
                self.logger.info(
                    "Checkpoint saved to %s (epoch %d%s, global step %d)", path, display, where, self.global_step
                )
        barrier(self.info)

    def save_ema(self, epoch: int) -> None:
        if self.is_main:
            path = atomic_torch_save(self.ema1.state_dict(), self.exp_dir / ema_checkpoint_name(epoch))
            self.logger.info("Saved EMA checkpoint to %s", path)

    # ------------------------------------------------------------------------------ step
    def draw_noise(self, x1: torch.Tensor) -> StepNoise:
        s = self.cfg.sampling
        return draw_step_noise(
            self.generator, x1, mean=float(s.mean), scale=float(s.scale), noise_scale=float(s.noise_scale),
            uniform_frac=float(s.uniform_frac),
        )

    def _dummy_batch(self) -> dict[str, Any]:
        """One zero row standing in for an all-failed batch, so every rank still runs the same
        collective forward/backward (its loss is multiplied by 0)."""
        shapes = self.dataset.shapes
        return {
            "audio_tokens": torch.zeros(1, self.dataset.num_tokens, self.dataset.audio_dim),
            "clip_features": torch.zeros(1, *shapes.clip),
            "sync_features": torch.zeros(1, *shapes.sync),
            "text_features": torch.zeros(1, *shapes.text),
            "video_exist": torch.zeros(1, dtype=torch.bool),
            "text_exist": torch.zeros(1, dtype=torch.bool),
        }

    def micro_step(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Loss of one micro-batch: (loss, per-sample loss, t_s, number of real rows)."""
        real = "audio_tokens" in batch
        if not real:
            batch = self._dummy_batch()
        dev = self.device
        x1 = batch["audio_tokens"].to(dev, non_blocking=True)
        clip_f, sync_f, text_f = (batch[k].to(dev, non_blocking=True) for k in ("clip_features", "sync_features", "text_features"))
        with self.autocast_factory():
            clip_f, sync_f, text_f = fill_missing_modalities(
                self.model, clip_f, sync_f, text_f, batch["video_exist"].to(dev), batch["text_exist"].to(dev)
            )
            noise = self.draw_noise(x1)
            clip_f, sync_f, text_f, _, _ = apply_label_drop(
                self.model, clip_f, sync_f, text_f, noise, *drop_probs(self.tr)
            )
            s = self.cfg.sampling
            out = flow_matching_loss(
                self.forward_model, x1, clip_f, sync_f, text_f, noise,
                prediction_type=str(s.prediction_type), loss_type=str(self.tr.loss_type),
                noise_shift=float(s.noise_shift), min_sigma=float(s.min_sigma),
            )
        loss = out.loss if real else out.loss * 0.0
        return loss, out.per_sample, out.t_s, (x1.shape[0] if real else 0)

    def optimizer_update(self, micro_batches: Sequence[dict[str, Any]], lr_epoch: float,
                         failed_in_epoch: int = 0) -> dict[str, Any]:
        """One optimiser step over `micro_batches` (gradient accumulation, DDP no_sync inside).
        `failed_in_epoch`: this rank's rows that failed to read so far this epoch; the stats'
        `failed_in_epoch` is that count summed over ranks (one all-reduce with the row count)."""
        lr = lr_at(
            global_step=self.global_step, lr_epoch=lr_epoch, lr_base=self.lr_base,
            warmup_steps=int(self.tr.warmup_steps), schedule=str(self.tr.lr_schedule),
            epochs=int(self.tr.epochs), min_lr=float(self.tr.min_lr),
            milestones=list(self.tr.steps), gamma=float(self.tr.gamma),
        )
        apply_lr(self.optimizer, lr)
        self.last_lr = lr
        self.optimizer.zero_grad(set_to_none=True)
        k = len(micro_batches)
        losses, per_samples, times, rows = [], [], [], 0
        for i, batch in enumerate(micro_batches):
            inner = self.info.is_distributed and i < k - 1
            with self.ddp_model.no_sync() if inner else nullcontext():  # type: ignore[operator]
                loss, per, t_s, n = self.micro_step(batch)
                (loss / k).backward()
            if n:
                losses.append(float(loss.detach()))
                per_samples.append(per.float().cpu())
                times.append(t_s.float().cpu())
                rows += n
        # Every row of every rank failed to read: the gradients are all zero, but AdamW
        # (momentum, decay) and the EMAs would still move. All ranks agree, then skip.
        total_rows, failed = (int(x) for x in all_reduce_sum(self.info, [float(rows), float(failed_in_epoch)]))
        if total_rows == 0:
            self.optimizer.zero_grad(set_to_none=True)
            stats = {"skipped": True, "loss": float("nan"), "lr": lr, "grad_norm": 0.0, "rows": 0,
                     "per_sample": torch.zeros(0), "t_s": torch.zeros(0)}
        else:
            stats = self._step_on(lr, rows, losses, per_samples, times)
        return {**stats, "failed_in_epoch": failed}

    def _step_on(self, lr: float, rows: int, losses: list[float], per_samples: list[torch.Tensor],
                 times: list[torch.Tensor]) -> dict[str, Any]:
        """Clip, step the optimiser and the EMAs (gradients are in place, some rank had rows)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        max_norm = float(self.tr.clip_grad_norm)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        if int(self.tr.max_nonfinite_steps) > 0 and not bool(torch.isfinite(grad_norm)):
            return self._skip_nonfinite_step(lr, float(grad_norm), losses)
        self.nonfinite_in_a_row = 0
        self.optimizer.step()
        self.ema1.update(self.model, self.global_step)
        self.ema2.update(self.model, self.global_step)
        self.global_step += 1
        return {
            "skipped": False,
            # the mean over this rank's real micro-batches; NaN only when this rank had none
            "loss": sum(losses) / len(losses) if losses else float("nan"),
            "lr": lr,
            "grad_norm": float(grad_norm),
            "rows": rows,
            "per_sample": torch.cat(per_samples) if per_samples else torch.zeros(0),
            "t_s": torch.cat(times) if times else torch.zeros(0),
        }

    def _skip_nonfinite_step(self, lr: float, grad_norm: float, losses: list[float]) -> dict[str, Any]:
        """A non-finite gradient norm (an inf/NaN gradient: clipping would turn it into NaN
        weights for good) skips the optimiser and EMA step. Under DDP the gradients are already
        all-reduced, so every rank sees the same norm and skips together."""
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_in_a_row += 1
        limit = int(self.tr.max_nonfinite_steps)
        loss = sum(losses) / len(losses) if losses else float("nan")
        if self.is_main:
            self.logger.warning(
                "GlobalStep %d: gradient norm %s (loss %.4g); optimiser/EMA step skipped, weights unchanged "
                "(%d in a row, training.max_nonfinite_steps=%d)", self.global_step, grad_norm, loss,
                self.nonfinite_in_a_row, limit)
        if self.nonfinite_in_a_row >= limit:
            raise WavFlowError(
                f"{self.nonfinite_in_a_row} optimiser steps in a row had a non-finite gradient norm (at global "
                f"step {self.global_step}); stopping with the last saved checkpoint intact. Lower training.lr, "
                "check the data for inf/NaN samples, or raise training.max_nonfinite_steps")
        return {"skipped": True, "reason": "nonfinite", "loss": loss, "lr": lr, "grad_norm": grad_norm,
                "rows": 0, "per_sample": torch.zeros(0), "t_s": torch.zeros(0)}

    def weights_digest(self) -> str:
        """sha1 over the bytes of every parameter (bitwise identity check across ranks)."""
        h = hashlib.sha1()
        for _, p in self.model.named_parameters():
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def check_weights_in_sync(self) -> bool:
        """Log whether every rank holds bit-identical weights (collective under DDP)."""
        mine = self.weights_digest()
        digests = [mine]
        if self.info.is_distributed:
            digests = [None] * self.world_size  # type: ignore[list-item]
            dist.all_gather_object(digests, mine)
        same = len(set(digests)) == 1
        if self.is_main:
            if same:
                self.logger.info("Weights identical on all %d rank(s) (sha1 %s)", self.world_size, mine)
            else:
                self.logger.error("Weights differ across ranks: %s", digests)
        return same

    # ---------------------------------------------------------------------------- signals
    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum: int, _frame: Any) -> None:
            self._stop_signal = signum
            # A second signal falls back to the old behaviour (e.g. KeyboardInterrupt).
            signal.signal(signum, self._old_handlers.get(signum, signal.SIG_DFL))

        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old_handlers[sig] = signal.getsignal(sig)
            signal.signal(sig, handler)

    def _restore_signal_handlers(self) -> None:
        for sig, old in self._old_handlers.items():
            try:
                signal.signal(sig, old)
            except (ValueError, TypeError):
                pass
        self._old_handlers.clear()

    def _should_stop(self) -> bool:
        """All ranks agree: a signal on any rank, or training.max_steps reached."""
        flag = 1.0 if self._stop_signal is not None else 0.0
        if self.info.is_distributed:
            t = torch.tensor([flag], device=self.device if self.info.backend == "nccl" else "cpu")
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = float(t.item())
        return flag > 0 or self._budget_spent()

    def _budget_spent(self) -> bool:
        """training.max_steps reached (the same answer on every rank: global_step is shared)."""
        max_steps = self.tr.max_steps
        return max_steps is not None and self.global_step >= int(max_steps)

    # ------------------------------------------------------------------------------ loop
    def train(self) -> TrainResult:
        tr = self.tr
        epochs = int(tr.epochs)
        start = time.time()
        stopped = False
        if self._budget_spent():
            # Checked before any step: a re-run of a finished run must not train past its budget.
            if self.is_main:
                self.logger.info(
                    "training.max_steps=%d already reached (global step %d in %s): nothing to train. "
                    "Raise training.max_steps to continue this run.",
                    int(tr.max_steps), self.global_step, self.latest_path,
                )
            self.tb.close()
            return TrainResult(self.exp_dir, self.epoch, self.global_step, True, 0)
        self._install_signal_handlers()
        try:
            while self.epoch < epochs and not stopped:
                stopped = self._train_epoch(epochs)
                if not stopped:
                    self._end_of_epoch(epochs)
            if stopped:
                self.save_checkpoints([LATEST_NAME])
                why = signal.Signals(self._stop_signal).name if self._stop_signal is not None else "training.max_steps"
                self.logger.info(
                    "Stopped by %s at epoch %d, global step %d; %s written. Run the same command to resume.",
                    why, self.epoch + 1, self.global_step, self.latest_path,
                )
            else:
                self.check_weights_in_sync()
                total = int(time.time() - start)
                self.logger.info("Training completed. Total time: %s", str(timedelta(seconds=total)))
        finally:
            self._restore_signal_handlers()
            self.tb.close()
        return TrainResult(self.exp_dir, self.epoch, self.global_step, stopped, self.skipped_rows)

    def _train_epoch(self, epochs: int) -> bool:
        """Train the rest of the current epoch; True when a stop was requested."""
        tr = self.tr
        epoch = self.epoch
        num_batches = self.num_batches()
        batch_size = int(tr.batch_size)
        consumed = self.samples_in_epoch  # global samples of this epoch trained before a resume
        # Batches this rank counts as done: all but those left for the rest of the global order.
        skip = num_batches - math.ceil(len(self._rest_of_epoch(epoch)) / batch_size) if consumed else 0
        if self.is_main:
            self.logger.info("Starting epoch %d", epoch + 1)
        epoch_start = last_log = time.time()
        rows_since_log = 0
        bucket_sum = torch.zeros(T_BUCKETS, dtype=torch.float64)
        bucket_count = torch.zeros(T_BUCKETS, dtype=torch.float64)
        failures = RowFailures()
        data_iter_step = skip
        pending: list[dict[str, Any]] = []
        bar = tqdm(total=num_batches, initial=skip, desc=f"epoch {epoch + 1}", disable=not self.is_main, leave=False)
        for batch in self._epoch_loader(epoch):
            for row_id, reason in batch.get("failed_rows", ()):
                failures.add(row_id, reason)
            if "audio_tokens" in batch:
                self.last_batch = batch
            pending.append(batch)
            if len(pending) < self.accum and data_iter_step + len(pending) < num_batches:
                continue
            stats = self.optimizer_update(pending, lr_epoch=data_iter_step / num_batches + epoch,
                                          failed_in_epoch=failures.count)
            if policy_broken(stats["failed_in_epoch"], len(self.dataset), self.row_limit):
                bar.close()
                self._stop_for_failed_rows(failures, stats["failed_in_epoch"])
            data_iter_step += len(pending)
            self.batch_in_epoch = data_iter_step
            self.samples_in_epoch = consumed + (data_iter_step - skip) * batch_size * self.world_size
            bar.update(len(pending))
            pending = []
            rows_since_log += stats["rows"]
            if stats["rows"]:
                idx = torch.clamp((stats["t_s"] * T_BUCKETS).long(), 0, T_BUCKETS - 1)
                bucket_sum.index_add_(0, idx, stats["per_sample"].double())
                bucket_count.index_add_(0, idx, torch.ones_like(stats["per_sample"], dtype=torch.float64))
            last_of_epoch = data_iter_step >= num_batches
            if stats["skipped"]:
                if self.is_main and stats.get("reason") != "nonfinite":  # that one is logged where it happens
                    self.logger.warning(
                        "Epoch [%d/%d] Step [%d/%d]: every row of this step failed to read on every rank; "
                        "no optimiser/EMA step (global step stays %d)",
                        epoch + 1, epochs, data_iter_step, num_batches, self.global_step,
                    )
            elif self.is_main and (self.global_step % int(tr.log_freq) == 0 or last_of_epoch) and stats["rows"]:
                now = time.time()
                throughput = rows_since_log / max(now - last_log, 1e-9)
                self.logger.info(
                    "Epoch [%d/%d] Step [%d/%d] GlobalStep %d Loss: %.4f LR: %.2e GradNorm: %.4f Throughput: %.1f samples/s",
                    epoch + 1, epochs, data_iter_step, num_batches, self.global_step,
                    stats["loss"], stats["lr"], stats["grad_norm"], throughput,
                )
                scalars = {
                    "train/loss": stats["loss"], "train/lr": stats["lr"],
                    "train/grad_norm": stats["grad_norm"], "train/samples_per_sec": throughput,
                }
                for b in range(T_BUCKETS):
                    if bucket_count[b] > 0:
                        scalars[f"train/loss_t{b / T_BUCKETS:.2f}-{(b + 1) / T_BUCKETS:.2f}"] = float(bucket_sum[b] / bucket_count[b])
                self.tb.scalars(scalars, self.global_step)
                bar.set_postfix(loss=f"{stats['loss']:.4f}")
                last_log, rows_since_log = now, 0
                bucket_sum.zero_()
                bucket_count.zero_()
            save_every = int(tr.save_every_steps)
            if save_every > 0 and self.global_step % save_every == 0 and not last_of_epoch:
                self.save_checkpoints([LATEST_NAME])
            if self._should_stop():
                bar.close()
                self._count_failed(failures)
                return True
        bar.close()
        self._count_failed(failures)
        if self.is_main:
            self.logger.info("Epoch %d completed in %.2fs", epoch + 1, time.time() - epoch_start)
        return False

    def _gather_failures(self, failures: RowFailures) -> RowFailures:
        """Every rank's failures in one (count summed; the first few of rank 0, then rank 1, ...)."""
        if not self.info.is_distributed:
            return failures
        parts: list[Any] = [None] * self.world_size
        dist.all_gather_object(parts, (failures.count, failures.first))
        merged = RowFailures()
        for count, first in parts:
            merged.merge(RowFailures(count=int(count), first=list(first)))
        return merged

    def _count_failed(self, failures: RowFailures) -> None:
        """End of an epoch (or a stop): log how many rows failed to read, and which."""
        merged = self._gather_failures(failures)
        self.skipped_rows += merged.count
        if merged.count and self.is_main:
            self.logger.warning("%d row(s) failed at read time this epoch and were skipped: %s",
                                merged.count, merged.examples())
        if policy_broken(merged.count, len(self.dataset), self.row_limit) and merged.count:
            self._stop_for_failed_rows(failures, merged.count)

    def _stop_for_failed_rows(self, failures: RowFailures, failed: int) -> None:
        """More rows failed this epoch than data.max_failed_fraction allows (the same verdict on
        every rank): stop without a checkpoint; the last one written stays the run's state."""
        merged = self._gather_failures(failures)
        merged.count = failed
        self.tb.close()
        check_rows(merged, len(self.dataset), self.row_limit,
                   what=f"row reads of epoch {self.epoch + 1} (rows x training.repeat_factor)",
                   where=str(self.exp_dir / "training.log"))

    def _end_of_epoch(self, epochs: int) -> None:
        """docs/method.md §8.6, in order: latest checkpoint, samples, epoch checkpoint, EMA checkpoint."""
        tr = self.tr
        display_epoch = self.epoch + 1
        last = display_epoch == epochs
        self.epoch = display_epoch
        self.batch_in_epoch = 0
        self.samples_in_epoch = 0
        if int(tr.checkpoint_freq) > 0 and (display_epoch % int(tr.checkpoint_freq) == 0 or last):
            self.save_checkpoints([LATEST_NAME])
        if int(tr.gen_train_freq) > 0 and (display_epoch % int(tr.gen_train_freq) == 0 or last):
            self._write_samples(display_epoch)
        if int(tr.checkpoint_save_epoch) > 0 and display_epoch % int(tr.checkpoint_save_epoch) == 0:
            self.save_checkpoints([epoch_checkpoint_name(display_epoch)])
        if int(tr.ema_checkpoint_save_epoch) > 0 and display_epoch % int(tr.ema_checkpoint_save_epoch) == 0:
            self.save_ema(display_epoch)
        self.tb.flush()

    def _write_samples(self, epoch: int) -> None:
        if self.rank >= MAX_SAMPLE_RANKS or self.last_batch is None:
            return
        try:
            gt_path, gen_path, gt, gen = generate_training_sample(
                self.model, self.last_batch, cfg=self.cfg, exp_dir=self.exp_dir, epoch=epoch,
                rank=self.rank, device=self.device, autocast=self.autocast_factory(),
            )
            self.logger.info("Wrote samples %s and %s", gt_path, gen_path)
            sr = int(self.cfg.data.target_sample_rate)
            self.tb.audio(f"samples/gt_rank{self.rank}", gt, sr, self.global_step)
            self.tb.audio(f"samples/gen_rank{self.rank}", gen, sr, self.global_step)
        except Exception as exc:  # samples are a side product: never stop training for them
            self.logger.warning("sample generation at epoch %d failed: %s: %s", epoch, type(exc).__name__, exc)


def run_training(cfg: DictConfig, info: DistInfo | None = None) -> TrainResult:
    """Build the trainer, train, and tear the process group down (when this call made it)."""
    _check_training_config(cfg)  # before a process group exists: bad keys fail fast and alone
    own = info is None
    info = info or init_distributed(str(cfg.training.device))
    try:
        return Trainer(cfg, info).train()
    finally:
        close_logging()
        release_run_locks()
        if own:
            cleanup(info)
