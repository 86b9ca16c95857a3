"""The inference job: CSV of videos/captions -> generated wavs (+ mp4s) and summary.csv (docs/method.md §5).

    python -m wavflow.predict [--config PATH] [--gpu N] [key=value ...]

Rows (`video_path,caption,video_exist,text_exist` + optional `id`, `features_path`):
video+text (VT2A), text only (T2A), video only (V2A) or neither (unconditional: both empty
tokens, i.e. the CFG unconditional branch). A row with `video_exist=1`, a `features_path`
and no video file takes its video conditions from the features file; it gets no mp4 (the
summary's reason says so). A bad row (missing / corrupt / too short video, unreadable
features, bad flag) is reported in summary.csv and skipped; the other rows are still written.
Exit code 1 if any row failed (the last line names the first ones), 0 otherwise; 2 for a bad
command line or config value (`--gpu` without CUDA), 3 for an input it cannot use (checkpoint,
a CSV without rows): docs/errors.md.

Inputs are never written: when `<output_dir>/<name>.wav` or `.mp4` would be one of the run's
input files (a video, a features file, the CSV), that row's outputs are named
`<name>_wavflow.*` instead (`_wavflow_1`, ... if that is taken too); its summary id stays
`<name>` (and so does its seed). A summary.csv that would replace an input is a ConfigError.

`--gpu N[,M...]` (or $GPU) sets CUDA_VISIBLE_DEVICES; it is an error when CUDA is not available.
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import pandas as pd
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from wavflow.audio import loudness_normalize, write_wav
from wavflow.config import load_config, parse_cli
from wavflow.errors import ConfigError, RowsFailedError, WavFlowError
from wavflow.exit_codes import EXIT_OK, run_job
from wavflow.generator import WavFlowGenerator, row_seed
from wavflow.infer_rows import STATUS_FAILED, STATUS_OK, STATUS_SKIPPED, InferRow, read_rows
from wavflow.io_utils import atomic_write_csv, path_inside
from wavflow.long_form.plan import check_long_form_mode, resolve_overlap, wants_windows
from wavflow.long_form.sampler import clip_plan, encode_windows, generate_long, LongFormItem
from wavflow.model.flow import SAMPLING_METHODS
from wavflow.row_policy import RowFailures
from wavflow.runtime import effective_precision, resolve_device
from wavflow.shapes import target_num_samples
from wavflow.video import mux_audio

log = logging.getLogger("wavflow.predict")

SUMMARY_COLUMNS = ("id", "status", "seconds", "model_calls", "duration_s", "windows", "loudness_lufs", "wav_path",
                   "mp4_path", "reason")
CLASH_SUFFIX = "_wavflow"  # output stem suffix when <name>.wav/.mp4 would overwrite an input
NO_VIDEO_FILE_REASON = "no video file (video features from features_path): mp4 not written"
_GPU_LIST = re.compile(r"\d+(,\d+)*")


# ----------------------------------------------------------------------------- inputs vs outputs


def _file_keys(path: Path) -> set:
    """Identities of a file: its resolved path, and (device, inode) when it exists (hard links)."""
    keys: set = {str(Path(path).resolve())}
    try:
        st = os.stat(path)
        keys.add((st.st_dev, st.st_ino))
    except OSError:
        pass
    return keys


def input_file_keys(rows: Sequence[InferRow], csv_path: str | os.PathLike) -> set:
    """Every file the run reads: the CSV, each row's video and features file."""
    keys = _file_keys(Path(csv_path))
    for row in rows:
        for p in (row.video, row.features_path):
            if p is not None:
                keys |= _file_keys(p)
    return keys


def assign_output_stems(rows: Sequence[InferRow], out_dir: Path, inputs: set) -> None:
    """Rename (CLASH_SUFFIX) the outputs of rows whose <name>.wav/.mp4 would overwrite an input."""
    taken = {r.name for r in rows}

    def clashes(stem: str) -> bool:
        return any(_file_keys(out_dir / f"{stem}{ext}") & inputs for ext in (".wav", ".mp4"))

    for row in rows:
        if not clashes(row.name):
            continue
        stem, k = f"{row.name}{CLASH_SUFFIX}", 0
        while stem in taken or clashes(stem):
            k += 1
            stem = f"{row.name}{CLASH_SUFFIX}_{k}"
        taken.add(stem)
        row.output_stem = stem
        log.warning("row %d (%s): %s/%s.{wav,mp4} would overwrite an input file; writing %s.* instead",
                    row.index, row.name, out_dir, row.name, stem)


# ----------------------------------------------------------------------------- config


def loudness_from_model(cfg: DictConfig) -> bool:
    """output.loudness_from_model: each clip at the loudness its conditions predict (docs/method.md §2.15)."""
    return bool(cfg.output.get("loudness_from_model", False))


def check_infer_config(cfg: DictConfig) -> None:
    """Job-level checks (ConfigError naming the key)."""

    for key in ("data.csv_path", "model.ckpt_path", "output.output_dir"):
        parts = key.split(".")
        value = cfg[parts[0]].get(parts[1])
        if not value:
            raise ConfigError(f"{key} must be set (e.g. {key}=path on the command line)")
    i = cfg.inference
    if not isinstance(i.batch_size, int) or i.batch_size < 1:
        raise ConfigError(f"inference.batch_size must be an integer >= 1, got {i.batch_size!r}")
    if not (isinstance(i.cfg, (int, float)) and math.isfinite(i.cfg) and i.cfg >= 0):
        raise ConfigError(f"inference.cfg must be a finite number >= 0, got {i.cfg!r}")
    if i.cfg_interval is not None and (len(i.cfg_interval) != 2 or i.cfg_interval[0] > i.cfg_interval[1]):
        raise ConfigError(f"inference.cfg_interval must be [lo, hi] with lo <= hi, got {list(i.cfg_interval)!r}")
    if cfg.sampling.method not in SAMPLING_METHODS:
        raise ConfigError(f"sampling.method must be one of {', '.join(SAMPLING_METHODS)}, got {cfg.sampling.method!r}")
    if not isinstance(cfg.sampling.num_steps, int) or cfg.sampling.num_steps < 1:
        raise ConfigError(f"sampling.num_steps must be an integer >= 1, got {cfg.sampling.num_steps!r}")
    if not cfg.sampling.noise_scale > 0:
        raise ConfigError(f"sampling.noise_scale must be > 0, got {cfg.sampling.noise_scale!r}")
    check_long_form_mode(i.get("long_form", "auto"))
    target = cfg.output.loudness_target_lufs
    if not (isinstance(target, (int, float)) and math.isfinite(target) and target < 0):
        raise ConfigError(f"output.loudness_target_lufs must be a negative number (LUFS), got {target!r}")
    if loudness_from_model(cfg) and not cfg.output.loudness_norm:
        raise ConfigError("output.loudness_from_model=true sets each clip's loudness target, which "
                          "output.loudness_norm=false turns off: set output.loudness_norm=true")


# ----------------------------------------------------------------------------- the job


@dataclass
class RunResult:
    rows: list[InferRow] = field(default_factory=list)
    summary_path: Optional[Path] = None

    @property
    def exit_code(self) -> int:
        return 1 if any(r.status == STATUS_FAILED for r in self.rows) else 0

    def check_failed_rows(self) -> None:
        """Raise RowsFailedError (exit 1) naming the first failed rows when any row failed:
        every row is meant to be generated (the others were written)."""
        failures = RowFailures()
        for row in self.rows:
            if row.status == STATUS_FAILED:
                failures.add(row.name, row.reason)
        if failures.count:
            raise RowsFailedError(f"{failures.count} of {len(self.rows)} row(s) failed; first: {failures.examples()}. "
                                  f"Every row's status and reason is in {self.summary_path}")


def _output_paths(out_dir: Path, row: InferRow, mux: bool) -> tuple[Path, Optional[Path]]:

    wav = out_dir / f"{row.stem}.wav"
    has_video = row.video is not None and row.video.is_file()
    mp4 = out_dir / f"{row.stem}.mp4" if (mux and has_video) else None
    for p in (wav, mp4):
        if p is not None and not path_inside(out_dir, p):  # sanitised names cannot, but be sure
            raise WavFlowError(f"output path {p} would fall outside output.output_dir {out_dir}")
    return wav, mp4


def write_outputs(gen, row: InferRow, wave, out_dir: Path, cfg: DictConfig) -> None:
    """Loudness-normalise (after trimming), write <name>.wav and, with a video, <name>.mp4."""
    wav_path, mp4_path = _output_paths(out_dir, row, bool(cfg.output.mux_video))
    if cfg.output.loudness_norm:
        target = row.predicted_lufs if row.predicted_lufs is not None else float(cfg.output.loudness_target_lufs)
        wave, lufs = loudness_normalize(wave, gen.sample_rate, target)
        if not (math.isfinite(lufs) and lufs > -70):
            log.info("row %s: output is silent or too short (%.1f LUFS); loudness left unchanged", row.name, lufs)
        else:
            row.loudness_lufs = target
    write_wav(wav_path, wave, gen.sample_rate)
    row.wav_path = str(wav_path)
    if mp4_path is not None:
        mux_audio(row.video, wave, gen.sample_rate, mp4_path)
        row.mp4_path = str(mp4_path)
    elif cfg.output.mux_video and row.has_video:
        row.reason = NO_VIDEO_FILE_REASON


def run(cfg: DictConfig, generator=None) -> RunResult:
    """Run the job on a loaded config; `generator` may be passed in (tests, notebooks)."""

    check_infer_config(cfg)
    device = generator.device if generator is not None else resolve_device(str(cfg.inference.device))
    precision = str(cfg.inference.precision)
    log.info("device: %s, precision: %s (inference.device=%s, inference.precision=%s)", device,
             effective_precision(device, precision), cfg.inference.device, precision)
    out_dir = Path(cfg.output.output_dir).absolute()
    rows = read_rows(cfg.data.csv_path, cfg.data.data_root)
    inputs = input_file_keys(rows, cfg.data.csv_path)
    result = RunResult(rows=rows, summary_path=out_dir / "summary.csv")
    if _file_keys(result.summary_path) & inputs:
        raise ConfigError(
            f"output.output_dir={cfg.output.output_dir}: its summary.csv ({result.summary_path}) would "
            "overwrite an input file of this run; choose another output.output_dir"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    assign_output_stems(rows, out_dir, inputs)
    mux, overwrite = bool(cfg.output.mux_video), bool(cfg.output.overwrite)
    pending = []
    for row in rows:
        if row.status:
            continue
        wav, mp4 = _output_paths(out_dir, row, mux)
        if not overwrite and wav.exists() and (mp4 is None or mp4.exists()):
            row.status, row.wav_path, row.mp4_path = STATUS_SKIPPED, str(wav), str(mp4 or "")
            row.reason = "outputs exist (output.overwrite=false)"
            if mp4 is None and mux and row.has_video:
                row.reason += f"; {NO_VIDEO_FILE_REASON}"
            continue
        if row.kind == "unconditional":
            log.info("row %d (%s) has neither video nor text: unconditional sample (both empty tokens)", row.index, row.name)
        pending.append(row)

    try:
        if pending:
            if generator is None:
                generator = WavFlowGenerator.from_checkpoint(
                    cfg.model.ckpt_path, config=cfg, use_ema=bool(cfg.model.use_ema), device=str(cfg.inference.device)
                )
            if loudness_from_model(cfg):
                generator.require_level_head("output.loudness_from_model=true")
            _run_batches(generator, pending, cfg, out_dir, row_seed)
    finally:
        summary = pd.DataFrame(
            [
                {
                    "id": r.name,
                    "status": r.status or STATUS_FAILED,
                    "seconds": round(r.seconds, 3),
                    "model_calls": r.model_calls,
                    "duration_s": r.duration if r.duration is not None else "",
                    "windows": r.windows if r.status == STATUS_OK else "",
                    "loudness_lufs": round(r.loudness_lufs, 2) if r.loudness_lufs is not None else "",
                    "wav_path": r.wav_path,
                    "mp4_path": r.mp4_path,
                    "reason": r.reason or ("" if r.status else "not processed (the job stopped early)"),
                }
                for r in rows
            ],
            columns=list(SUMMARY_COLUMNS),
        )
        atomic_write_csv(summary, result.summary_path)
    counts = {s: sum(r.status == s for r in rows) for s in (STATUS_OK, STATUS_SKIPPED, STATUS_FAILED)}
    log.info("done: %d ok, %d skipped (exist), %d failed; summary in %s", counts[STATUS_OK],
             counts[STATUS_SKIPPED], counts[STATUS_FAILED], result.summary_path)
    return result


def _run_batches(gen, pending: list[InferRow], cfg: DictConfig, out_dir: Path, row_seed) -> None:

    seed, bs = int(cfg.inference.seed), int(cfg.inference.batch_size)
    pending, long_rows = split_long_rows(gen, pending, cfg)
    if long_rows:
        _run_long_rows(gen, long_rows, cfg, out_dir, seed)
    if any(r.has_video for r in pending):
        gen.check_video_lengths()
    bar = tqdm(total=len(pending), desc="predict", unit="row", disable=None)
    for start in range(0, len(pending), bs):
        chunk, feats = [], []
        for row in pending[start : start + bs]:
            t0 = time.perf_counter()
            try:
                feats.append(
                    gen.encode_row(
                        video=row.video,
                        text=row.caption,
                        features_path=row.features_path,
                        want_video=row.has_video,
                    )
                )
                chunk.append(row)
            except Exception as exc:  # one bad row must not stop the others
                row.fail(_reason(exc))
                bar.update(1)
            row.seconds += time.perf_counter() - t0
        if not chunk:
            continue
        if loudness_from_model(cfg):
            for row, lufs in zip(chunk, gen.predict_loudness(feats)):
                row.predicted_lufs = lufs
        _sample_and_write(gen, chunk, lambda: gen.generate_batch(feats, [row_seed(seed, r.name) for r in chunk]),
                          f"with {cfg.sampling.method}", out_dir, cfg, bar)
    bar.close()


def _sample_and_write(gen, chunk: list[InferRow], sample: Callable[[], Sequence[Any]], how: str, out_dir: Path,
                      cfg: DictConfig, bar: Any) -> None:
    """Sample one batch of rows (`sample()` -> one wave per row), then write each row's outputs;
    a failure fails the batch's rows (sampling) or the row (writing), never the job."""
    t0 = time.perf_counter()
    try:
        waves = sample()
    except Exception as exc:
        for r in chunk:
            r.fail(f"sampling failed for the batch: {_reason(exc)}")
        bar.update(len(chunk))
        return
    share = (time.perf_counter() - t0) / len(chunk)
    calls = int(getattr(gen, "last_model_calls", 0))
    log.info("sampled %d row(s) %s: %d model call(s)", len(chunk), how, calls)
    for row, wave in zip(chunk, waves):
        t1 = time.perf_counter()
        row.model_calls = calls  # the batch's sampler calls (each row shared them)
        try:
            write_outputs(gen, row, wave, out_dir, cfg)
            row.status = STATUS_OK
        except Exception as exc:
            row.fail(f"writing outputs failed: {_reason(exc)}")
        row.seconds += share + time.perf_counter() - t1
        bar.update(1)


def split_long_rows(gen, rows: list[InferRow], cfg: DictConfig) -> tuple[list[InferRow], list[tuple[InferRow, Any]]]:
    """(rows of one trained-duration clip, (row, WindowPlan) of rows made in windows).

    A row's length is its `duration` column, else its video's length (inference.long_form
    auto/on), else the trained duration; it is made in windows when inference.long_form asks
    for that at this length (docs/long_form.md). A row whose length cannot be read fails.
    """
    mode = check_long_form_mode(cfg.inference.get("long_form", "auto"))
    overlap = cfg.inference.get("window_overlap_sec")
    if mode != "off":
        resolve_overlap(overlap, gen.duration)  # a bad key fails the job before any row
    short, long_rows = [], []
    for row in rows:
        try:
            video = row.video if row.video is not None and row.video.is_file() else None
            length = gen.clip_length(video, row.duration, mode)
            if wants_windows(mode, target_num_samples(gen.sample_rate, length), gen.num_samples):
                if row.has_video and video is None:
                    raise WavFlowError(f"{length:g} s asks for windows, which need the video file "
                                       "(cached features hold one trained-duration clip)")
                long_rows.append((row, clip_plan(gen, length, overlap)))
                continue
            if row.duration is not None and not math.isclose(row.duration, gen.duration):
                fix = ("inference.long_form=auto or on makes longer clips in windows" if row.duration > gen.duration
                       else "a shorter clip needs data.audio_duration set for the whole run")
                raise WavFlowError(f"duration={row.duration:g} differs from the trained {gen.duration:g} s "
                                   f"(inference.long_form={mode}): {fix}")
            row.duration = gen.duration
        except Exception as exc:  # one bad row must not stop the others
            row.fail(_reason(exc))
            continue
        short.append(row)
    return short, long_rows


def _run_long_rows(gen, long_rows: list[tuple[InferRow, Any]], cfg: DictConfig, out_dir: Path, seed: int) -> None:
    """Rows longer than the trained duration, batch_size clips at a time, window k of each together."""
    bs = int(cfg.inference.batch_size)
    bar = tqdm(total=len(long_rows), desc="predict (long rows)", unit="row", disable=None)
    for start in range(0, len(long_rows), bs):
        chunk, items = [], []
        for row, plan in long_rows[start: start + bs]:
            t0 = time.perf_counter()
            try:
                text = gen.encode_row(text=row.caption, features_path=row.features_path).text
                video = row.video if row.has_video else None
                items.append(LongFormItem(plan=plan, windows=encode_windows(gen, plan, video=video, text=text),
                                          seed=row_seed(seed, row.name)))
                chunk.append(row)
            except Exception as exc:
                row.fail(_reason(exc))
                bar.update(1)
            row.seconds += time.perf_counter() - t0
        if not chunk:
            continue
        for row, item in zip(chunk, items):
            row.windows, row.duration = item.plan.count, item.plan.total_samples / gen.sample_rate
            if loudness_from_model(cfg):
                row.predicted_lufs = gen.predict_clip_loudness(item.windows)
        how = "in windows (" + "; ".join(it.plan.describe() for it in items) + ")"
        _sample_and_write(gen, chunk, lambda: generate_long(gen, items), how, out_dir, cfg, bar)
    bar.close()


def _reason(exc: BaseException) -> str:
    text = str(exc).replace("\n", " ").strip()
    return text if isinstance(exc, WavFlowError) else f"{type(exc).__name__}: {text}"


# ----------------------------------------------------------------------------- CLI


def _pop_gpu(argv: list[str]) -> tuple[list[str], Optional[str]]:
    """Take `--gpu N[,M...]` / `--gpu=...` out of argv (else $GPU): (rest, device list or None).

    The value must be a comma-separated list of device indices (ConfigError naming `--gpu` or
    `GPU` otherwise), so `--gpu model.ckpt_path=x` cannot silently swallow an override.
    """
    env = os.environ.get("GPU", "").strip()
    gpu: Optional[str] = env or None
    source, rest, i = "GPU (environment variable)", [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--gpu":
            if i + 1 >= len(argv) or argv[i + 1].startswith("-"):
                raise ConfigError("--gpu needs a device index or a comma-separated list (e.g. --gpu 0 or --gpu 0,1)")
            gpu, source, i = argv[i + 1], "--gpu", i + 2
            continue
        if arg.startswith("--gpu="):
            gpu, source = arg.split("=", 1)[1], "--gpu"
        else:
            rest.append(arg)
        i += 1
    if gpu is not None and not _GPU_LIST.fullmatch(gpu.strip()):
        raise ConfigError(f"{source} must be a device index or a comma-separated list of them (e.g. 0 or 0,1), got {gpu!r}")
    return rest, (gpu.strip() if gpu is not None else None)


def require_gpu(gpu: str, cfg: DictConfig) -> None:
    """The user asked for a GPU: restrict CUDA to it, and fail rather than fall back to CPU."""
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu  # before torch initialises CUDA (on first use, not at import)
    if not torch.cuda.is_available():
        raise ConfigError(
            f"--gpu {gpu} (or GPU={gpu}) was given but CUDA is not available on this machine "
            "(torch.cuda.is_available() is False); drop --gpu / GPU to run on CPU"
        )
    if str(cfg.inference.device) == "cpu":
        raise ConfigError(f"--gpu {gpu} (or GPU={gpu}) contradicts inference.device=cpu; drop one of them")


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s %(levelname)s] %(message)s")
    args = list(sys.argv[1:] if argv is None else argv)
    return run_job("predict", lambda: _predict(args))


def _predict(args: list[str]) -> int:
    args, gpu = _pop_gpu(args)

    path, overrides = parse_cli(args, "infer.yaml")
    cfg = load_config(path, overrides, job="infer")
    if gpu is not None:
        require_gpu(gpu, cfg)
    run(cfg).check_failed_rows()
    return EXIT_OK

if __name__ == "__main__":
    sys.exit(main())
