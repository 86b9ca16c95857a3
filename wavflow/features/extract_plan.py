"""What an extraction run will do, decided before any model loads.

- `ExtractSettings.from_config(cfg)`: the typed view of the `extract_*.yaml` keys, with the
  checks that make a bad config fail at start-up (ConfigError naming the keys);
  `extraction.batch_size` is at most `MAX_BATCH_SIZE` (4096): a batch holds its decoded clips in
  memory at once, so a larger value is a typo heading for an out-of-memory kill.
- `plan_rows(settings)`: read and validate the input CSV. Missing columns, an empty CSV,
  duplicate ids and ids unsafe as file names are fatal (one ManifestError listing every bad
  row). Missing audio/video files become *error rows* (they end up in the error log and the
  run goes on), unless `extraction.strict_paths` makes them fatal too.
- `expected_feature_shapes` / `feature_file_problem`: when a `<id>.pth` counts as done, so a
  re-run can skip it. A truncated or incomplete file is redone, and so is one whose stored
  source fingerprint (`SOURCE_KEY`: caption, video file, duration, mode, encoders) differs from
  the row's now; files without a fingerprint (e.g. reference caches) are accepted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from wavflow.config_values import required_key
from wavflow.errors import CheckpointError, ConfigError, ManifestError
from wavflow.features.extract_outputs import OutputPaths
from wavflow.io_utils import describe_load_error, safe_torch_load
from wavflow.manifest import (
    EXTRACT_T2A_COLUMNS,
    EXTRACT_VT2A_COLUMNS,
    ManifestReport,
    check_files,
    check_ids,
    read_manifest,
    resolve_path,
)
from wavflow.shapes import FeatureShapes, sync_segment_count, video_seq_lens
from wavflow.row_policy import POLICY_KEY, max_failed_fraction

MODES = ("t2a", "vt2a")
DEVICES = ("auto", "cpu", "cuda")
EMPTY_STRING_FILE = "empty_string.pt"  # beside the <id>.pth files; `.pt` cannot collide with them
# Extra str entry of every `<id>.pth` this job writes: what the features were made from. Readers
# (trainer, predictor) only look up the three feature keys, so it is ignored there.
SOURCE_KEY = "wavflow_source"
# The encoder keys whose change makes old features wrong (weights, tokenizer, profile).
ENCODER_IDENTITY_KEYS = ("profile", "clip_model", "clip_tokenizer", "clip_pretrained", "synchformer_ckpt")

def _key(cfg: DictConfig, key: str) -> Any:
    return required_key(cfg, key, "start from configs/extract_t2a.yaml or extract_vt2a.yaml")


def _positive_int(cfg: DictConfig, key: str, minimum: int = 1) -> int:
    value = _key(cfg, key)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{key} must be an integer >= {minimum}, got {value!r}")
    return value


# extraction.batch_size decoded clips are held at once (VT2A: ~115 MB of CLIP frames per 8 s
# clip): a value past this bound is a typo that would end in an out-of-memory kill, not a run.
MAX_BATCH_SIZE = 4096


def _batch_size(cfg: DictConfig) -> int:
    value = _positive_int(cfg, "extraction.batch_size")
    if value > MAX_BATCH_SIZE:
        raise ConfigError(
            f"extraction.batch_size={value} is above the limit of {MAX_BATCH_SIZE}: a batch holds that many "
            "decoded clips and their features in memory at once (16-64 suits most machines)"
        )
    return value


def _path(cfg: DictConfig, key: str) -> Path:
    value = _key(cfg, key)
    if value is None or not str(value).strip():
        raise ConfigError(f"{key} is not set: pass {key}=PATH")
    return Path(str(value)).expanduser().absolute()


@dataclass(frozen=True)
class ExtractSettings:
    mode: str
    input_csv: Path
    data_root: str | None
    pth_dir: Path
    output_csv: Path
    duration_sec: float
    batch_size: int
    num_workers: int
    device: str
    save_interval: int
    strict_paths: bool
    max_failed_fraction: float  # data.max_failed_fraction (wavflow/row_policy.py)
    clip_seq_len: int
    sync_seq_len: int
    text_seq_len: int
    clip_dim: int
    sync_dim: int
    text_dim: int
    encoders_identity: str = ""  # JSON of ENCODER_IDENTITY_KEYS, part of every row fingerprint
    packed_dir: Path | None = None  # output.packed_dir: pack the merged CSV's rows there (features/packed.py)
    shard_rows: int = 256  # output.shard_rows

    @property
    def needs_video(self) -> bool:
        return self.mode == "vt2a"

    @property
    def input_columns(self) -> tuple[str, ...]:
        return EXTRACT_VT2A_COLUMNS if self.needs_video else EXTRACT_T2A_COLUMNS

    @property
    def empty_string_path(self) -> Path:
        return self.pth_dir / EMPTY_STRING_FILE

    def feature_path(self, sample_id: str) -> Path:
        return self.pth_dir / f"{sample_id}.pth"

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "ExtractSettings":
        mode = _key(cfg, "extraction.mode")
        if mode not in MODES:
            raise ConfigError(f"extraction.mode must be one of {', '.join(MODES)}, got {mode!r}")
        device = str(_key(cfg, "extraction.device"))
        if device not in DEVICES:  # the GPU of a rank is always cuda:LOCAL_RANK
            raise ConfigError(f"extraction.device must be one of {', '.join(DEVICES)}, got {device!r}")
        duration = _key(cfg, "extraction.duration_sec")
        if not isinstance(duration, (int, float)) or isinstance(duration, bool) or duration <= 0:
            raise ConfigError(f"extraction.duration_sec must be a positive number of seconds, got {duration!r}")
        # Not used to decode, but the features are made for training at this duration: a
        # nonsense value must stop here, named, not later as a sequence-length mismatch.
        audio_duration = _key(cfg, "data.audio_duration")
        if not isinstance(audio_duration, (int, float)) or isinstance(audio_duration, bool) or audio_duration <= 0:
            raise ConfigError(f"data.audio_duration must be a positive number of seconds, got {audio_duration!r}")
        data_root = _key(cfg, "data.data_root")
        settings = cls(
            mode=mode,
            input_csv=_path(cfg, "data.csv_path"),
            data_root=str(data_root) if data_root not in (None, "") else None,
            pth_dir=_path(cfg, "output.pth_dir"),
            output_csv=_path(cfg, "output.csv_path"),
            duration_sec=float(duration),
            batch_size=_batch_size(cfg),
            num_workers=_positive_int(cfg, "extraction.num_workers", minimum=0),
            device=device,
            save_interval=_positive_int(cfg, "extraction.save_interval"),
            strict_paths=bool(_key(cfg, "extraction.strict_paths")),
            max_failed_fraction=max_failed_fraction(_key(cfg, POLICY_KEY)),
            clip_seq_len=_positive_int(cfg, "data.clip_seq_len"),
            sync_seq_len=_positive_int(cfg, "data.sync_seq_len"),
            text_seq_len=_positive_int(cfg, "data.text_seq_len"),
            clip_dim=_positive_int(cfg, "data.clip_dim"),
            sync_dim=_positive_int(cfg, "data.sync_dim"),
            text_dim=_positive_int(cfg, "data.text_dim"),
            encoders_identity=json.dumps(
                {k: _plain(OmegaConf.select(cfg, f"encoders.{k}", default=None)) for k in ENCODER_IDENTITY_KEYS},
                sort_keys=True,
            ),
            packed_dir=_path(cfg, "output.packed_dir") if _key(cfg, "output.packed_dir") not in (None, "") else None,
            shard_rows=_positive_int(cfg, "output.shard_rows") if _key(cfg, "output.packed_dir") not in (None, "") else 256,
        )
        if settings.output_csv.suffix.lower() != ".csv":
            raise ConfigError(f"output.csv_path must end in .csv, got {settings.output_csv}")
        settings._check_outputs_spare_input_csv()
        if settings.needs_video:
            settings._check_video_lengths()
        return settings

    def _check_outputs_spare_input_csv(self) -> None:
        """The job must never write over its input CSV (checked before anything loads)."""
        target = _real(self.input_csv)
        paths = OutputPaths(self.output_csv)
        written = {
            "output.csv_path": paths.csv_path,
            "the error log": paths.errors_log,
            "the summary": paths.summary_json,
            "empty_string.pt": self.empty_string_path,
        }
        if self.packed_dir is not None:
            written["the packed CSV (output.packed_dir)"] = self.packed_dir / paths.csv_path.name
            if _real(self.packed_dir / paths.csv_path.name) == _real(paths.csv_path):
                raise ConfigError(f"output.packed_dir={self.packed_dir} would put the packed CSV over output.csv_path="
                                  f"{paths.csv_path}: set output.packed_dir to another folder")
        for what, path in written.items():
            if _real(path) == target:
                raise ConfigError(
                    f"{what} ({path}) is the input CSV data.csv_path={self.input_csv}: the run would overwrite "
                    "it; set output.csv_path / output.pth_dir elsewhere"
                )
        stem = re.escape(paths.stem)
        patterns = {
            paths.directory: (rf"{stem}_rank\d+\.csv", rf"{stem}_errors_rank\d+\.log"),
            self.pth_dir: (rf"extract_{re.escape(self.mode)}_rank\d+\.log",),
        }
        for directory, names in patterns.items():
            if _real(directory) == target.parent and any(re.fullmatch(n, target.name) for n in names):
                raise ConfigError(
                    f"the input CSV data.csv_path={self.input_csv} has the name of a per-rank file the run "
                    f"writes in {directory}: rename it or set output.csv_path / output.pth_dir elsewhere"
                )

    def _check_video_lengths(self) -> None:
        """The feature lengths a duration gives must be the ones the data config declares."""
        if sync_segment_count(self.duration_sec) < 1:
            raise ConfigError(
                f"extraction.duration_sec={self.duration_sec} is too short for one 16-frame Synchformer "
                "segment (needs at least 0.64 s)"
            )
        clip_len, sync_len = video_seq_lens(self.duration_sec)
        if (clip_len, sync_len) != (self.clip_seq_len, self.sync_seq_len):
            raise ConfigError(
                f"extraction.duration_sec={self.duration_sec} gives {clip_len} CLIP frames and {sync_len} "
                f"Synchformer tokens, but data.clip_seq_len={self.clip_seq_len} and "
                f"data.sync_seq_len={self.sync_seq_len}: set data.clip_seq_len={clip_len} "
                f"data.sync_seq_len={sync_len} (or change extraction.duration_sec)"
            )


def _plain(value: Any) -> Any:
    return value if value is None or isinstance(value, (bool, int, float)) else str(value)


def _real(path: Path) -> Path:
    """Symlinks and `..` resolved, so two spellings of one file compare equal."""
    return Path(os.path.realpath(path))


def _file_stamp(path: Path | None) -> list[Any] | None:
    """(resolved path, size, mtime_ns): changes when the file is replaced or edited."""
    if path is None:
        return None
    try:
        st = path.stat()
    except OSError:
        return [str(_real(path)), None, None]
    return [str(_real(path)), st.st_size, st.st_mtime_ns]


def row_fingerprint(settings: ExtractSettings, caption: str, text_exist: int, video_path: Path | None) -> str:
    """sha256 hex of everything a row's features are made from (not the audio: it is not encoded)."""
    source = {
        "mode": settings.mode,
        "caption": caption,
        "text_exist": int(text_exist),
        "video": _file_stamp(video_path) if settings.needs_video else None,
        "duration_sec": settings.duration_sec if settings.needs_video else None,
        "encoders": settings.encoders_identity,
    }
    return hashlib.sha256(json.dumps(source, sort_keys=True).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ExtractRow:
    """One input row. `problem` is set for rows that fail validation (error rows)."""

    index: int  # position in the input CSV (0-based, header excluded)
    id: str
    audio_path: Path  # absolute
    video_path: Path | None  # absolute; None in t2a mode
    caption: str
    problem: str | None = None
    fingerprint: str = ""  # `row_fingerprint` at plan time; stored as SOURCE_KEY in the .pth

    @property
    def text_exist(self) -> int:
        return int(bool(self.caption.strip()))


def plan_rows(settings: ExtractSettings, logger: logging.Logger | None = None) -> list[ExtractRow]:
    """Read + validate the input CSV; return every row (error rows carry `problem`)."""
    df = read_manifest(settings.input_csv, required=settings.input_columns)
    if len(df) == 0:
        raise ManifestError(f"CSV {settings.input_csv} has a header but no rows: nothing to extract")
    report = ManifestReport(settings.input_csv)
    check_ids(df, report)
    fatal_rows = set(report.bad_rows)
    check_files(df, report, "audio_path", settings.data_root)
    if settings.needs_video:
        check_files(df, report, "video_path", settings.data_root)
    if fatal_rows or (settings.strict_paths and report.problems):
        why = "ids must be unique and usable as file names" if fatal_rows else "extraction.strict_paths=true"
        raise ManifestError(f"{report.format()}\nNothing was extracted ({why}).")
    if report.problems and logger is not None:
        logger.warning("%s\nThese rows become error rows; the other rows are extracted.", report.format())

    problems: dict[int, list[str]] = {}
    for p in report.problems:
        problems.setdefault(p.line - 2, []).append(p.reason)
    rows = []
    for pos, (idx, rec) in enumerate(df.iterrows()):
        video = resolve_path(rec["video_path"], settings.data_root) if settings.needs_video else None
        reasons = problems.get(int(idx))
        caption = rec["caption"]
        text_exist = int(bool(caption.strip()))
        rows.append(
            ExtractRow(
                index=pos,
                id=rec["id"],
                audio_path=resolve_path(rec["audio_path"], settings.data_root),
                video_path=video,
                caption=caption,
                problem="; ".join(reasons) if reasons else None,
                fingerprint=row_fingerprint(settings, caption, text_exist, video),
            )
        )
    _check_outputs_spare_inputs(settings, rows)
    return rows


def _check_outputs_spare_inputs(settings: ExtractSettings, rows: Sequence[ExtractRow]) -> None:
    """No file the run writes (a `<id>.pth`, empty_string.pt, the output CSV and its siblings) may
    be an input audio/video file or the input CSV. ConfigError, before any model loads."""
    paths = OutputPaths(settings.output_csv)
    pth_dir = _real(settings.pth_dir)  # resolved once: ids are plain file names
    written: dict[Path, str] = {pth_dir / f"{r.id}.pth": f"<pth_dir>/{r.id}.pth" for r in rows}
    written[_real(settings.empty_string_path)] = "<pth_dir>/empty_string.pt"
    for path in (paths.csv_path, paths.errors_log, paths.summary_json):
        written[_real(path)] = str(path)
    if _real(settings.input_csv) in written:
        raise ConfigError(
            f"the input CSV data.csv_path={settings.input_csv} would be overwritten by "
            f"{written[_real(settings.input_csv)]}: set output.pth_dir / output.csv_path elsewhere"
        )
    for row in rows:
        for column, path in (("audio_path", row.audio_path), ("video_path", row.video_path)):
            if path is not None and _real(path) in written:
                raise ConfigError(
                    f"row id {row.id!r}: its {column} {path} would be overwritten by {written[_real(path)]}: "
                    "set output.pth_dir / output.csv_path elsewhere"
                )


def expected_feature_shapes(settings: ExtractSettings) -> dict[str, tuple[int, int]]:
    """Keys and shapes of a complete `<id>.pth` for this mode and config."""
    return FeatureShapes.from_data_config(settings).by_key(with_video=settings.needs_video)




def feature_file_problem(path: Path, shapes: dict[str, tuple[int, int]], fingerprint: str | None = None) -> str | None:
    """None when `path` is a complete feature file for this row, else why it must be (re)made.

    Complete: loads weights-only, holds every expected float tensor shape, and its SOURCE_KEY
    equals `fingerprint` (a file without SOURCE_KEY, e.g. a reference cache, is accepted)."""
    if not path.is_file():
        return "no feature file yet"
    try:
        data = safe_torch_load(path, what="feature file")
    except CheckpointError as exc:
        return f"unreadable feature file ({describe_load_error(exc)})"
    if not isinstance(data, dict):
        return f"feature file holds a {type(data).__name__}, not a dict"
    for key, shape in shapes.items():
        value = data.get(key)
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            return f"{key} missing or not a float tensor"
        if tuple(value.shape) != shape:
            return f"{key} has shape {tuple(value.shape)}, expected {shape}"
    stored = data.get(SOURCE_KEY)
    if fingerprint is not None and stored is not None and stored != fingerprint:
        return "made from another caption, video, duration or encoders (source fingerprint differs)"
    return None


def feature_file_complete(path: Path, shapes: dict[str, tuple[int, int]], fingerprint: str | None = None) -> bool:
    return feature_file_problem(path, shapes, fingerprint) is None


def empty_string_complete(path: Path, settings: ExtractSettings) -> bool:
    """True when `empty_string.pt` loads and is a (text_seq_len, text_dim) float tensor."""
    if not path.is_file():
        return False
    try:
        value = safe_torch_load(path, what="empty-string feature")
    except CheckpointError:
        return False
    return (
        isinstance(value, torch.Tensor)
        and value.is_floating_point()
        and tuple(value.shape) == (settings.text_seq_len, settings.text_dim)
    )
