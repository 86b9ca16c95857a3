"""Audio samples during training (docs/method.md §8.7, with docs/design.md §4's fixes): sample 0 of the last
batch, learned empty tokens for its missing modalities, and a generator of its own so the
training randomness is untouched."""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wavflow.audio import unpatchify, write_wav
from wavflow.io_utils import sanitize_filename
from wavflow.model.flow import cfg_denoiser, euler_sample
from wavflow.shapes import target_num_samples
from wavflow.train.fsdp import is_sharded, unshard_root
from wavflow.train.logging_utils import TensorBoard
from wavflow.train.step import fill_missing_modalities

MAX_SAMPLE_RANKS = 8  # ranks that write samples at the end of an epoch


def sample_seed(seed: int, rank: int, epoch: int) -> int:
    """Seed of the sample generator: distinct per global rank and epoch, unrelated to training."""
    return (int(seed) * 7919 + 1_000_003 * (rank + 1) + epoch) % (2**63 - 1)


def sample_paths(exp_dir: Path, epoch: int, rank: int, sample_id: str) -> tuple[Path, Path]:
    folder = exp_dir / "samples" / f"epoch_{epoch}"
    safe = sanitize_filename(sample_id)
    return folder / f"gt_rank{rank}_id_{safe}.wav", folder / f"gen_rank{rank}_id_{safe}.wav"


@torch.no_grad()
def generate_training_sample(
    model: nn.Module,
    batch: dict[str, Any],
    *,
    cfg: Any,
    exp_dir: Path,
    epoch: int,
    rank: int,
    device: torch.device,
    autocast: AbstractContextManager,
) -> tuple[Path, Path, torch.Tensor, torch.Tensor]:
    """Write `{gt,gen}_rank<R>_id_<id>.wav` for sample 0 of `batch`; returns paths and waves."""
    data, sampling = cfg.data, cfg.sampling
    sr = int(data.target_sample_rate)
    n_samples = target_num_samples(sr, float(data.audio_duration))
    scale = float(data.audio_scale)
    x1 = batch["audio_tokens"][:1]
    clip_f = batch["clip_features"][:1].to(device)
    sync_f = batch["sync_features"][:1].to(device)
    text_f = batch["text_features"][:1].to(device)
    clip_f, sync_f, text_f = fill_missing_modalities(
        model, clip_f, sync_f, text_f, batch["video_exist"][:1].to(device), batch["text_exist"][:1].to(device)
    )
    generator = torch.Generator(device).manual_seed(sample_seed(int(cfg.training.seed), rank, epoch))
    x0 = torch.randn(x1.shape, generator=generator, device=device) * float(sampling.noise_scale)
    was_training = model.training
    model.eval()
    try:
        with autocast:
            cond = model.preprocess_conditions(clip_f, sync_f, text_f)
            empty = model.get_empty_conditions(1)
            fn = cfg_denoiser(model, cond, empty, float(cfg.eval.cfg), batched=False)
            x = euler_sample(
                fn,
                x0,
                num_steps=int(cfg.eval.num_steps),
                shift=float(sampling.noise_shift),
                min_sigma=float(sampling.min_sigma),
                prediction_type=str(sampling.prediction_type),
            )
    finally:
        model.train(was_training)
    gt_wave = (unpatchify(x1[0].float().cpu()) / scale)[:n_samples]
    gen_wave = (unpatchify(x[0].float().cpu()) / scale)[:n_samples]
    gt_path, gen_path = sample_paths(exp_dir, epoch, rank, str(batch["id"][0]))
    if rank >= MAX_SAMPLE_RANKS:
        return gt_path, gen_path, gt_wave, gen_wave  # sampled to keep a sharded network's collectives in step
    gt_path.parent.mkdir(parents=True, exist_ok=True)
    write_wav(gt_path, gt_wave, sr)
    write_wav(gen_path, gen_wave, sr)
    return gt_path, gen_path, gt_wave, gen_wave


def write_epoch_samples(model: nn.Module, batch: dict[str, Any], *, cfg: Any, exp_dir: Path, epoch: int, rank: int,
                        device: torch.device, autocast: AbstractContextManager, logger: logging.Logger,
                        tb: TensorBoard, global_step: int) -> None:
    """The end-of-epoch sample pair of one rank (the first MAX_SAMPLE_RANKS ranks), as wavs and
    in TensorBoard. Samples are a side product: a failure is logged, never stops training."""
    if rank >= MAX_SAMPLE_RANKS and not is_sharded(model):
        return  # sharded: every rank takes part in the network's gathers, the first ones write
    unshard_root(model)  # the empty tokens are read outside forward
    try:
        gt_path, gen_path, gt, gen = generate_training_sample(
            model, batch, cfg=cfg, exp_dir=exp_dir, epoch=epoch, rank=rank, device=device, autocast=autocast,
        )
        if rank >= MAX_SAMPLE_RANKS:
            return
        logger.info("Wrote samples %s and %s", gt_path, gen_path)
        sr = int(cfg.data.target_sample_rate)
        tb.audio(f"samples/gt_rank{rank}", gt, sr, global_step)
        tb.audio(f"samples/gen_rank{rank}", gen, sr, global_step)
    except Exception as exc:
        logger.warning("sample generation at epoch %d failed: %s: %s", epoch, type(exc).__name__, exc)
