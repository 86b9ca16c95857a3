"""The feature-extraction job: `python -m wavflow.features.extract [--config PATH] [key=value ...]`.

Usually launched by `scripts/launch/extract_t2a.sh` / `extract_vt2a.sh` under torchrun. Steps:

1. Config and input CSV are checked before anything heavy happens (`extract_plan`): a bad key,
   missing columns, duplicate or unsafe ids stop the run with one error; rows whose audio or
   video file is missing become error rows.
2. Rows are sharded over ranks (r, r+W, ...). A row whose `<id>.pth` already loads with every
   expected tensor, and whose stored source fingerprint (caption, video file, duration, mode,
   encoders; `extract_plan.SOURCE_KEY`) matches, is *skipped* but keeps its row in the output
   CSV (the reference dropped it). Files without a fingerprint (reference caches) are accepted.
3. The rest is decoded (VT2A: `wavflow.video.decode_video` in DataLoader workers, so decoding
   overlaps encoding), encoded in batches (`FeatureEncoders`; T2A never loads Synchformer or
   decodes video) and written as `<pth_dir>/<id>.pth` atomically:
   T2A `{text_features}`, VT2A `{clip_features, sync_features, text_features}`, float32 CPU,
   plus the str `wavflow_source` (the row fingerprint; readers ignore it).
   An empty caption gives `text_exist=0`; its `text_features` are those of "" (equal to
   `empty_string.pt`) so every file has the same keys.
4. Rank 0 writes `<pth_dir>/empty_string.pt` ((77, D_text) float32) for the trainer.
5. Per-rank CSV parts and error logs are merged by rank 0 (`extract_outputs`) into
   `output.csv_path` (absolute paths, input order), `<stem>_errors.log` and
   `<stem>_summary.json`.

Exit codes: 0 = the run finished and the output CSV has at least one row (failed rows are in
the error log); 2 = fatal problem (bad config, bad CSV, missing weights...), nothing merged;
1 = the run finished but every row failed (the CSV has only a header). The launchers keep
these codes (wavflow/torchrun_guard.py).
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from wavflow.audio import probe_audio
from wavflow.config import load_config, parse_cli
from wavflow.distributed import all_reduce_sum, barrier, cleanup, DistInfo, init_distributed, shard_indices
from wavflow.errors import AudioError, FeatureError, VideoError
from wavflow.exit_codes import EXIT_OK, EXIT_ROWS_FAILED, run_job
from wavflow.features.extract_outputs import first_errors, merge_outputs, OutputPaths, RankOutputs, write_summary
from wavflow.features.extract_plan import (
    empty_string_complete,
    expected_feature_shapes,
    ExtractRow,
    ExtractSettings,
    feature_file_problem,
    plan_rows,
    SOURCE_KEY,
)
from wavflow.features.report import analyse_csv, format_report, STATS_FILENAME
from wavflow.io_utils import atomic_torch_save
from wavflow.row_policy import check_rows, LISTED, policy_broken, RowFailures
from wavflow.video import decode_video, sync_segments

DEFAULT_CONFIG = "extract_vt2a.yaml"


# ------------------------------------------------------------------ seams (tests patch these)
def build_encoders(encoders_cfg: Any, *, need_video: bool, device: torch.device) -> Any:
    """The CLIP (+ Synchformer when `need_video`) encoders; imported late (open_clip is heavy)."""
    from wavflow.features.encoders import FeatureEncoders  # lazy: open_clip takes ~4 s to import

    return FeatureEncoders.from_config(encoders_cfg, need_video=need_video, device=device)


def decode_clip(path: Path, duration_sec: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(clip frames (T_c, 3, 384, 384) in [0, 1], sync frames (T_s, 3, 224, 224) in [-1, 1])."""
    frames = decode_video(path, duration_sec)
    return frames.clip, frames.sync


def make_sync_segments(sync_frames: torch.Tensor) -> torch.Tensor:
    return sync_segments(sync_frames)


# ------------------------------------------------------------------------------ logging
def _rank_logger(settings: ExtractSettings, rank: int) -> logging.Logger:
    """Console (rank 0: INFO, others: WARNING) + `<pth_dir>/extract_<mode>_rank<r>.log`."""
    logger = logging.getLogger(f"wavflow.extract.rank{rank}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    _close_logger(logger)
    fmt = logging.Formatter(f"[%(levelname)s][Rank {rank}] %(asctime)s - %(message)s")
    settings.pth_dir.mkdir(parents=True, exist_ok=True)
    file_handler = logging.FileHandler(settings.pth_dir / f"extract_{settings.mode}_rank{rank}.log", encoding="utf-8")
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    for h in (file_handler, console):
        h.setFormatter(fmt)
        logger.addHandler(h)
    return logger


def _close_logger(logger: logging.Logger) -> None:
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()


# ------------------------------------------------------------------------ decoding dataset
class _DecodeDataset(Dataset):
    """Item i of the rows to encode: decoded frames (VT2A) or nothing to decode (T2A), once
    the row's audio has been found to decode (`probe_audio`).

    A decode failure is returned as an `error` item, never raised, so one bad file cannot
    stop a worker or the batch it is in.
    """

    def __init__(self, rows: Sequence[ExtractRow], settings: ExtractSettings) -> None:
        self.rows = rows
        self.settings = settings

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, pos: int) -> dict[str, Any]:
        row = self.rows[pos]
        try:  # training reads this audio: a row whose audio does not decode is not done
            probe_audio(row.audio_path)
        except AudioError as exc:
            return {"pos": pos, "error": f"audio skipped: {exc}"}
        if not self.settings.needs_video:
            return {"pos": pos}
        try:
            clip, sync = decode_clip(row.video_path, self.settings.duration_sec)
        except VideoError as exc:
            return {"pos": pos, "error": f"video skipped: {exc}"}
        except Exception as exc:  # a decoder bug must not kill the whole run
            return {"pos": pos, "error": f"video decode failed ({type(exc).__name__}: {exc})"}
        return {"pos": pos, "clip": clip, "sync": sync}


@dataclass
class _Batch:
    positions: list[int] = field(default_factory=list)
    clip: torch.Tensor | None = None
    sync: torch.Tensor | None = None
    failures: list[tuple[int, str]] = field(default_factory=list)


def _collate(items: list[dict[str, Any]]) -> _Batch:
    batch = _Batch()
    good = []
    for item in items:
        if "error" in item:
            batch.failures.append((item["pos"], item["error"]))
        else:
            good.append(item)
    batch.positions = [item["pos"] for item in good]
    if good and "clip" in good[0]:
        batch.clip = torch.stack([item["clip"] for item in good])
        batch.sync = torch.stack([item["sync"] for item in good])
    return batch


# ------------------------------------------------------------------------------ encoding
def _check_shape(name: str, value: torch.Tensor, want: tuple[int, ...], key_hint: str) -> None:
    if tuple(value.shape) != want:
        raise FeatureError(
            f"encoder output {name} has shape {tuple(value.shape)}, expected {want}: check {key_hint} "
            "against the encoders in use"
        )


def _encode(encoders: Any, rows: Sequence[ExtractRow], batch: _Batch, settings: ExtractSettings,
            device: torch.device, select: Sequence[int] | None = None) -> list[dict[str, torch.Tensor]]:
    """Features of the batch (or of its items `select`), one float32 CPU dict per row."""
    idx = list(range(len(batch.positions))) if select is None else list(select)
    captions = [rows[batch.positions[i]].caption if rows[batch.positions[i]].text_exist else "" for i in idx]
    n = len(idx)
    out: dict[str, torch.Tensor] = {"text_features": encoders.encode_text(captions)}
    _check_shape("text_features", out["text_features"], (n, settings.text_seq_len, settings.text_dim),
                 "data.text_seq_len / data.text_dim")
    if settings.needs_video:
        assert batch.clip is not None and batch.sync is not None
        pick = torch.tensor(idx)
        clip = batch.clip.index_select(0, pick)
        sync = batch.sync.index_select(0, pick).to(device, non_blocking=True)
        segments = torch.stack([make_sync_segments(s) for s in sync])
        out["clip_features"] = encoders.encode_clip_frames(clip)
        out["sync_features"] = encoders.encode_sync(segments)
        _check_shape("clip_features", out["clip_features"], (n, settings.clip_seq_len, settings.clip_dim),
                     "data.clip_seq_len / data.clip_dim / extraction.duration_sec")
        _check_shape("sync_features", out["sync_features"], (n, settings.sync_seq_len, settings.sync_dim),
                     "data.sync_seq_len / data.sync_dim / extraction.duration_sec")
    return [{k: v[j].detach().float().cpu().clone() for k, v in out.items()} for j in range(n)]


def _encode_with_fallback(encoders: Any, rows: Sequence[ExtractRow], batch: _Batch, settings: ExtractSettings,
                          device: torch.device, logger: logging.Logger) -> Iterator[tuple[int, dict | str]]:
    """Yield (position, features) or (position, error reason). A failing batch is retried item by
    item so one bad sample does not fail its batch-mates; a shape mismatch (FeatureError) is a
    config problem and stops the run."""
    try:
        feats = _encode(encoders, rows, batch, settings, device)
        yield from zip(batch.positions, feats)
        return
    except FeatureError:
        raise
    except Exception as exc:
        if len(batch.positions) == 1:
            yield batch.positions[0], f"encode failed ({type(exc).__name__}: {exc})"
            return
        logger.warning("batch of %d failed (%s: %s); retrying one by one", len(batch.positions), type(exc).__name__, exc)
    for i, pos in enumerate(batch.positions):
        try:
            yield pos, _encode(encoders, rows, batch, settings, device, select=[i])[0]
        except FeatureError:
            raise
        except Exception as exc:
            yield pos, f"encode failed ({type(exc).__name__}: {exc})"


# ------------------------------------------------------------------------------- the run
@dataclass(frozen=True)
class ExtractResult:
    done: int  # .pth files written by this run (all ranks)
    skipped: int  # rows whose complete .pth already existed (all ranks)
    failed: int  # error rows (all ranks)
    rows: int  # rows in the merged CSV (= done + skipped)
    csv_path: Path
    errors_log: Path
    summary_path: Path
    max_failed_fraction: float = 0.0
    first_failures: tuple[tuple[str, str], ...] = ()  # (id, reason) of the first failed rows

    @property
    def exit_code(self) -> int:
        return EXIT_ROWS_FAILED if self.policy_broken else EXIT_OK

    @property
    def policy_broken(self) -> bool:
        return policy_broken(self.failed, self.done + self.skipped + self.failed, self.max_failed_fraction)

    def check_failed_rows(self) -> None:
        """Raise RowsFailedError (exit 1) when more rows failed than data.max_failed_fraction allows."""
        failures = RowFailures(count=self.failed, first=list(self.first_failures))
        check_rows(failures, self.done + self.skipped + self.failed, self.max_failed_fraction,
                   what="rows of the input CSV", where=str(self.errors_log))


class _Counts:
    def __init__(self) -> None:
        self.done = self.skipped = self.failed = 0


def _loader(rows: Sequence[ExtractRow], settings: ExtractSettings, device: torch.device) -> DataLoader:
    workers = settings.num_workers if settings.needs_video else 0
    return DataLoader(
        _DecodeDataset(rows, settings),
        batch_size=settings.batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda" and settings.needs_video,
        persistent_workers=False,
    )


def _process_rank(rows: list[ExtractRow], settings: ExtractSettings, encoders_cfg: Any, info: DistInfo,
                  out: RankOutputs, logger: logging.Logger, write_empty_string: bool) -> _Counts:
    """Everything one rank does with its shard: skip, fail, or encode + save each row.
    `write_empty_string`: this rank (0) makes `empty_string.pt` if it is missing or broken."""
    counts = _Counts()
    shapes = expected_feature_shapes(settings)
    video_exist = 1 if settings.needs_video else 0

    def emit_row(row: ExtractRow) -> None:
        out.add_row(row.id, row.audio_path, settings.feature_path(row.id), video_exist, row.text_exist)

    def fail(row: ExtractRow, reason: str) -> None:
        logger.warning("[SKIP] %s: %s", row.id, reason)
        out.add_error(row.id, reason)
        counts.failed += 1

    todo: list[ExtractRow] = []
    for row in tqdm(rows, desc="checking existing features", disable=not info.is_main or not rows, leave=False):
        if row.problem:
            fail(row, row.problem)
        elif (why := feature_file_problem(settings.feature_path(row.id), shapes, row.fingerprint)) is None:
            emit_row(row)
            counts.skipped += 1
        else:
            if settings.feature_path(row.id).exists():
                logger.info("[REDO] %s: %s", row.id, why)
            todo.append(row)

    need_empty = write_empty_string and not empty_string_complete(settings.empty_string_path, settings)
    encoders: Any = None

    def get_encoders(need_video: bool) -> Any:
        # Built on first use: a re-run whose remaining rows all fail to decode loads no model.
        nonlocal encoders
        if encoders is None:
            profile = OmegaConf.select(encoders_cfg, "profile", default="default")
            logger.info("building encoders (profile %s, Synchformer %s) on %s", profile, need_video, info.device)
            encoders = build_encoders(encoders_cfg, need_video=need_video, device=info.device)
        return encoders

    if todo:
        logger.info("encoding %d rows in batches of %d", len(todo), settings.batch_size)
        bar = tqdm(total=len(todo), desc=f"extract {settings.mode}", unit="clip", disable=not info.is_main)
        for batch in _loader(todo, settings, info.device):
            for pos, reason in batch.failures:
                fail(todo[pos], reason)
            if batch.positions:
                enc = get_encoders(settings.needs_video)
                for pos, result in _encode_with_fallback(enc, todo, batch, settings, info.device, logger):
                    row = todo[pos]
                    if isinstance(result, str):
                        fail(row, result)
                        continue
                    try:
                        # the fingerprint lets a re-run notice an edited caption or a replaced video
                        atomic_torch_save({**result, SOURCE_KEY: row.fingerprint}, settings.feature_path(row.id))
                    except Exception as exc:
                        fail(row, f"pth_save_failed: {type(exc).__name__}: {exc}")
                        continue
                    emit_row(row)
                    counts.done += 1
            bar.update(len(batch.positions) + len(batch.failures))
        bar.close()
    if need_empty:
        feature = get_encoders(False).empty_string_feature()
        atomic_torch_save(feature.detach().float().cpu().clone(), settings.empty_string_path)
        logger.info("wrote %s", settings.empty_string_path)
    if encoders is None:
        logger.info("no model loaded on this rank (%d skipped, %d failed)", counts.skipped, counts.failed)
    return counts


def _report_and_stats(cfg: DictConfig, settings: ExtractSettings, paths: OutputPaths,
                      logger: logging.Logger) -> dict[str, Any]:
    """Rank 0, after the merge: per-dimension statistics of every row (`feature_stats.pt` in
    pth_dir, for data.feature_norm) and the feature-quality report (features/report.py) over the
    merged training CSV; `label` / `onsets` columns of the input CSV feed its class and onset
    metrics."""
    from wavflow.features.encoders import encoder_identity  # lazy: open_clip (~4 s)
    meta = pd.read_csv(settings.input_csv, dtype=str, keep_default_na=False, na_filter=False)
    meta = meta if {"label", "onsets"} & set(meta.columns) else None
    max_rows = int(OmegaConf.select(cfg, "extraction.report_max_rows", default=512))
    report, stats = analyse_csv(paths.csv_path, meta=meta, max_rows=max_rows,
                                encoder_identity=encoder_identity(cfg.encoders), progress=False)
    stats.save(settings.pth_dir / STATS_FILENAME)
    for line in format_report(report).splitlines():
        (logger.warning if line.startswith("WARNING") else logger.info)(line)
    return report


def _pack(settings: ExtractSettings, paths: OutputPaths, logger: logging.Logger) -> str | None:
    """Rank 0, after the report: the merged CSV's features packed into shards when
    output.packed_dir is set (wavflow/features/packed.py); the packed CSV's path."""
    if settings.packed_dir is None:
        return None
    from wavflow.features.packed import pack_csv

    result = pack_csv(paths.csv_path, settings.packed_dir, shard_rows=settings.shard_rows, show_progress=False)
    logger.info("packed %d rows into %d shard(s) (%d written): train with data.train_csv=%s",
                result.rows, result.shards, result.written, result.csv_path)
    return str(result.csv_path)


def run_extraction(cfg: DictConfig) -> ExtractResult:
    """Run the job in this process (one rank of torchrun, or alone). Raises WavFlowError on fatal
    problems; returns the summed counts (identical on every rank)."""
    started = time.time()
    settings = ExtractSettings.from_config(cfg)
    plan = plan_rows(settings)  # fatal CSV problems stop here, before any model or process group
    info = init_distributed(settings.device)
    logger = _rank_logger(settings, info.rank)
    paths = OutputPaths(settings.output_csv)
    try:
        if info.is_main:
            bad = [r for r in plan if r.problem]
            logger.info(
                "extract %s: %d rows from %s -> %s (%d rank(s), device %s)",
                settings.mode, len(plan), settings.input_csv, settings.pth_dir, info.world_size, info.device,
            )
            if bad:
                logger.warning("%d row(s) have missing files and become error rows, e.g. %s: %s",
                               len(bad), bad[0].id, bad[0].problem)
        mine = [plan[i] for i in shard_indices(len(plan), info)]
        logger.info("run started: rank %d of %d, %d rows in this shard", info.rank, info.world_size, len(mine))
        with RankOutputs(paths, info.rank, settings.save_interval) as out:
            # No valid row at all: no features to pair the empty-string file with, no model to load.
            any_valid = any(r.problem is None for r in plan)
            counts = _process_rank(mine, settings, cfg.encoders, info, out, logger, info.is_main and any_valid)
        # The all-reduce doubles as the barrier: every part is closed before rank 0 merges.
        done, skipped, failed = (int(x) for x in all_reduce_sum(info, [counts.done, counts.skipped, counts.failed]))
        if info.is_main:
            merged = merge_outputs(paths, info.world_size, [r.id for r in plan])
            summary = {
                "mode": settings.mode,
                "input_csv": str(settings.input_csv),
                "input_rows": len(plan),
                "done": done,
                "skipped": skipped,
                "failed": failed,
                "csv_rows": merged.rows,
                "csv_path": str(paths.csv_path),
                "errors_log": str(paths.errors_log),
                "max_failed_fraction": settings.max_failed_fraction,
                "failed_rows_within_policy": not policy_broken(failed, len(plan), settings.max_failed_fraction),
                "pth_dir": str(settings.pth_dir),
                "world_size": info.world_size,
                "seconds": round(time.time() - started, 3),
            }
            summary["feature_report"] = _report_and_stats(cfg, settings, paths, logger) if merged.rows else None
            summary["packed_csv"] = _pack(settings, paths, logger) if merged.rows else None
            write_summary(paths, summary)
            logger.info(
                "Summary: done=%d skipped=%d failed=%d -> %d CSV rows in %s; errors in %s",
                done, skipped, failed, merged.rows, paths.csv_path, paths.errors_log,
            )
            if failed:
                first = RowFailures(count=failed, first=list(first_errors(paths.errors_log, LISTED)))
                logger.warning("%d row(s) failed (data.max_failed_fraction=%g): %s", failed,
                               settings.max_failed_fraction, first.examples())
        # Wait for rank 0's merge: a rank leaving with code 1 makes torchrun stop the others.
        barrier(info)
        return ExtractResult(done, skipped, failed, done + skipped, paths.csv_path, paths.errors_log,
                             paths.summary_json, settings.max_failed_fraction, first_errors(paths.errors_log, LISTED))
    finally:
        _close_logger(logger)
        cleanup(info)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_job("extract", lambda: _extract(argv))


def _extract(argv: list[str]) -> int:
    config_path, overrides = parse_cli(argv, DEFAULT_CONFIG)
    # no model is built: skip model checks. A user file without a configs/ parent composes
    # over the defaults of the mode the launcher asks for (extraction.mode=...).
    modes = [o.split("=", 1)[1] for o in overrides if o.startswith("extraction.mode=")]
    job = f"extract_{modes[-1]}" if modes and modes[-1] in ("t2a", "vt2a") else Path(DEFAULT_CONFIG).stem
    cfg = load_config(config_path, overrides, validate=False, job=job)
    run_extraction(cfg).check_failed_rows()
    return EXIT_OK

if __name__ == "__main__":
    sys.exit(main())
