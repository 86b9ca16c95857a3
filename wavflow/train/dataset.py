"""Training data: read + validate the training CSV(s), and the Dataset / collate (docs/method.md §4).

Rows: `id,audio_path,features_path,video_exist,text_exist` (flags default to 1 when the column
is absent). Every problem found up front (missing files, bad flags, duplicate ids across all
CSVs, feature tensors of the wrong shape) goes into one report per CSV; `data.on_bad_row`
decides between skipping those rows (each logged with its reason) and stopping. Rows that
fail later, at read time, become None and are dropped (and counted) by `collate_train`.
"""

from __future__ import annotations

import importlib
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import soundfile as sf
import torch
from torch.utils.data import Dataset

from wavflow.audio import integrated_loudness, lift_to_tokens, load_audio
from wavflow.errors import FeatureError, ManifestError
from wavflow.features.packed import KEY_COLUMN, read_row_features, ShardReader
from wavflow.manifest import (
    check_files,
    check_flags,
    check_ids,
    ManifestReport,
    parse_flag,
    read_manifest,
    resolve_path,
)
from wavflow.row_policy import check_rows, RowFailures
from wavflow.shapes import FeatureShapes, latent_seq_len

log = logging.getLogger("wavflow.train")

REQUIRED_COLUMNS = ("id", "audio_path", "features_path")
FLAG_COLUMNS = ("video_exist", "text_exist")
BAD_ROW_POLICIES = ("skip", "error")


@dataclass(frozen=True)
class TrainRow:
    sample_id: str
    audio_path: Path
    features_path: Path
    video_exist: bool
    text_exist: bool
    csv_index: int  # which CSV of data.train_csv
    row_index: int  # DataFrame index within that CSV (line = index + 2)
    features_key: str = ""  # the row's name in the shard features_path names; "": a per-row .pth

    @property
    def packed(self) -> bool:
        return bool(self.features_key)


def csv_list(train_csv: Any) -> list[str]:
    """`data.train_csv` as a list of paths (a single path or a list)."""
    if train_csv is None or train_csv == "" or (not isinstance(train_csv, str) and len(train_csv) == 0):
        raise ManifestError("data.train_csv is not set: give a training CSV path (or a list of paths)")
    if isinstance(train_csv, (str, Path)):
        return [str(train_csv)]
    return [str(p) for p in train_csv]


def read_train_csvs(
    csv_paths: Sequence[str], data_root: str | None
) -> tuple[list[TrainRow], list[ManifestReport]]:
    """Read every CSV, check columns/ids/flags/files; return the candidate rows and the reports.

    Rows listed in a report are not returned. Missing required columns raise at once
    (ManifestError naming the file and the columns).
    """
    rows: list[TrainRow] = []
    reports: list[ManifestReport] = []
    first_seen: dict[str, tuple[Path, int]] = {}
    for csv_index, path in enumerate(csv_paths):
        df = read_manifest(path, REQUIRED_COLUMNS, optional=(KEY_COLUMN,))
        for col in FLAG_COLUMNS:  # docs/method.md §4: an absent flag column means "present"
            if col not in df.columns:
                df[col] = "1"
        report = ManifestReport(Path(path))
        check_ids(df, report, seen=first_seen)
        check_flags(df, report, FLAG_COLUMNS)
        check_files(df, report, "audio_path", data_root)
        check_files(df, report, "features_path", data_root)
        for idx, row in df.iterrows():
            if int(idx) in report.bad_rows:
                continue
            rows.append(
                TrainRow(
                    sample_id=row["id"],
                    audio_path=resolve_path(row["audio_path"], data_root),
                    features_path=resolve_path(row["features_path"], data_root),
                    video_exist=bool(parse_flag(row["video_exist"])),
                    text_exist=bool(parse_flag(row["text_exist"])),
                    csv_index=csv_index,
                    row_index=int(idx),
                    features_key=row[KEY_COLUMN].strip(),
                )
            )
        reports.append(report)
    return rows, reports


def _check_tensor(feats: Mapping[str, Any], key: str, want: tuple[int, int]) -> str | None:
    if key not in feats:
        return f"{key} missing"
    value = feats[key]
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        return f"{key} is not a float tensor"
    if tuple(value.shape) != want:
        return f"{key} has shape {tuple(value.shape)}, expected {want}"
    if not bool(torch.isfinite(value).all()):
        return f"{key} holds non-finite values"
    return None


def load_features(row: TrainRow, shapes: FeatureShapes, shards: ShardReader | None = None) -> dict[str, torch.Tensor]:
    """The three condition tensors of a row, from its own file or its shard; zeros for absent
    modalities (even if stored).

    FeatureError naming the file when it cannot be read or a needed tensor is wrong.
    """
    feats = read_row_features(row.features_path, row.features_key, shards, row.sample_id)
    out: dict[str, torch.Tensor] = {}
    problems: list[str] = []  # all of them, so a shape hint can name every key to change
    for key, stream, exists in (
        ("clip_features", shapes.clip, row.video_exist),
        ("sync_features", shapes.sync, row.video_exist),
        ("text_features", shapes.text, row.text_exist),
    ):
        if not exists:
            out[key] = torch.zeros(stream)
            continue
        problem = _check_tensor(feats, key, stream)
        if problem:
            problems.append(problem)
            continue
        out[key] = feats[key].float()
    if problems:
        where = f"feature shard {row.features_path} row" if row.packed else f"features file {row.features_path}"
        raise FeatureError(f"{where} (id {row.sample_id!r}): {'; '.join(problems)}")
    return out


_SHAPE_PROBLEM = re.compile(r"(clip|sync|text)_features has shape \((\d+), (\d+)\), expected \((\d+), (\d+)\)")


def _shape_mismatches(reason: str) -> list[tuple[str, int, int, int, int]]:
    """(stream, found_len, found_dim, want_len, want_dim) for each shape problem in a reason."""
    return [(m[0], int(m[1]), int(m[2]), int(m[3]), int(m[4])) for m in _SHAPE_PROBLEM.findall(reason)]


def shape_hint(reasons: Sequence[str]) -> str:
    """`data.*=value` overrides that would make systematic shape mismatches fit, or ''."""
    settings: dict[str, int] = {}
    for reason in reasons:
        for stream, found_len, found_dim, want_len, want_dim in _shape_mismatches(reason):
            if found_len != want_len:
                settings.setdefault(f"data.{stream}_seq_len", found_len)
            if found_dim != want_dim:
                settings.setdefault(f"data.{stream}_dim", found_dim)
    return " ".join(f"{k}={v}" for k, v in settings.items())


def _systematic_mismatch(
    csv_rows: Sequence[TrainRow], feature_problems: Mapping[TrainRow, str]
) -> str | None:
    """A stream whose every carrying row (video for clip/sync, text for text) in this CSV has
    the same wrong shape: a config mismatch, not a few bad files. Returns its description."""
    for stream in ("clip", "sync", "text"):
        carriers = [r for r in csv_rows if (r.text_exist if stream == "text" else r.video_exist)]
        if not carriers:
            continue
        found: Counter[tuple[int, int, int, int]] = Counter()
        for r in carriers:
            for s, *dims in _shape_mismatches(feature_problems.get(r, "")):
                if s == stream:
                    found[tuple(dims)] += 1  # type: ignore[arg-type]
        if len(found) == 1 and next(iter(found.values())) == len(carriers):
            fl, fd, wl, wd = next(iter(found))
            return f"every {stream}_features tensor has shape ({fl}, {fd}), expected ({wl}, {wd})"
    return None


def _check_each_csv_kept_rows(
    rows: Sequence[TrainRow], reports: Sequence[ManifestReport], feature_problems: Mapping[int, str]
) -> None:
    """Stop when a CSV lost all its rows, or one of its streams is mis-shaped throughout:
    training on without it would silently drop a whole modality/data set."""
    by_row = {rows[pos]: reason for pos, reason in feature_problems.items()}
    for csv_index, report in enumerate(reports):
        csv_rows = [r for r in rows if r.csv_index == csv_index]
        kept = [r for r in csv_rows if r not in by_row]
        if not report.problems:
            continue
        systematic = _systematic_mismatch(csv_rows, by_row)
        if kept and systematic is None:
            continue
        reasons = [p.reason for p in report.problems]
        hint = shape_hint(reasons)
        what = (
            f"{systematic} (data.* does not match how the features were extracted)" if systematic
            else f"all {len(report.bad_rows)} row(s) failed the check"
        )
        msg = f"training CSV {report.path}: {what}; refusing to train without it."
        if hint:
            msg += f" Set {hint} (e.g. on the command line) to match the feature files."
        else:
            msg += " Fix the rows below or remove the CSV from data.train_csv."
        raise ManifestError(msg + "\n" + report.format(limit=10))


def select_rows(
    rows: list[TrainRow],
    reports: list[ManifestReport],
    feature_problems: Mapping[int, str],
    on_bad_row: str,
    max_failed: float = 0.0,
) -> list[TrainRow]:
    """Fold feature problems into the reports, then skip (logging each) or stop.

    Even under `skip`, a CSV whose rows all fail (or whose features are mis-shaped throughout)
    stops the run with a ManifestError naming the CSV and the data.* keys to set, and more bad
    rows than `max_failed` (data.max_failed_fraction) of all rows with a RowsFailedError."""
    if on_bad_row not in BAD_ROW_POLICIES:
        raise ManifestError(f"data.on_bad_row={on_bad_row!r} is not one of {', '.join(BAD_ROW_POLICIES)}")
    for pos, reason in sorted(feature_problems.items()):
        row = rows[pos]
        reports[row.csv_index].add(row.row_index, row.sample_id, reason)
    good = [r for pos, r in enumerate(rows) if pos not in feature_problems]
    bad_reports = [r for r in reports if r.problems]
    if bad_reports:
        text = "\n".join(r.format(limit=10_000) for r in bad_reports)
        if on_bad_row == "error":  # the first line (the job's last) names the first bad row
            first = bad_reports[0]
            raise ManifestError(
                f"training CSV check failed (data.on_bad_row=error): {first.path} {first.problems[0]}\n{text}")
        _check_each_csv_kept_rows(rows, reports, feature_problems)
        failures = RowFailures()
        for report in bad_reports:
            for problem in report.problems:
                log.warning("skipping %s line %d (id %r): %s", report.path, problem.line, problem.row_id, problem.reason)
                failures.add(str(problem.row_id), f"{report.path} line {problem.line}: {problem.reason}")
        # rows holds the CSV rows that passed the file checks; the feature problems are among them
        total = len(rows) + sum(len(r.bad_rows) for r in reports) - len(feature_problems)
        check_rows(failures, total, max_failed,
                   what="training CSV rows (data.on_bad_row=skip)", where="the 'skipping' warnings above")
    if not good:
        raise ManifestError("no usable training rows left after the CSV check" + (f":\n{text}" if bad_reports else ""))
    return good


def warn_if_audio_short(rows: Sequence[TrainRow], duration: float, probe: int = 3) -> None:
    """One warning when the first few audio files are much shorter than data.audio_duration
    (they would be mostly zero padding). Cheap: reads headers only; unreadable files are left
    to the read-time check."""
    lengths: list[float] = []
    for row in rows[:probe]:
        try:
            info = sf.info(str(row.audio_path))
        except Exception:
            return
        lengths.append(info.frames / max(info.samplerate, 1))
    if lengths and max(lengths) < 0.5 * duration:
        log.warning(
            "the first %d audio file(s) last at most %.2fs but data.audio_duration=%gs: clips are zero-padded; "
            "set data.audio_duration to the clip length (and the matching data.*_seq_len)",
            len(lengths), max(lengths), duration,
        )


FAILED_KEY = "failed_row"  # the one key of an item whose row could not be read: (id, reason)


class TrainDataset(Dataset):
    """Items `{id, audio_tokens (N, audio_dim), clip_features, sync_features, text_features,
    video_exist, text_exist}`, or `{failed_row: (id, reason)}` when the row cannot be read.
    With `measure_loudness` (the loudness head's target, docs/method.md §2.15) items also hold
    `loudness_lufs`: the BS.1770 loudness of the whole file before the lifting (nan when the
    file is shorter than one 0.4 s gating block)."""

    def __init__(self, rows: Sequence[TrainRow], data_cfg: Any, repeat_factor: int = 1,
                 measure_loudness: bool = False) -> None:
        if repeat_factor < 1:
            raise ManifestError(f"training.repeat_factor must be >= 1, got {repeat_factor}")
        self.rows = list(rows)
        self.repeat_factor = int(repeat_factor)
        self.measure_loudness = bool(measure_loudness)
        self._warned_loudness = False
        if self.measure_loudness:  # imported here once (1.2 s) so forked DataLoader workers inherit it
            importlib.import_module("pyloudnorm")
        self.shapes = FeatureShapes.from_data_config(data_cfg)
        self.sample_rate = int(data_cfg.target_sample_rate)
        self.duration = float(data_cfg.audio_duration)
        self.audio_dim = int(data_cfg.audio_dim)
        self.audio_scale = float(data_cfg.audio_scale)
        self.num_tokens = latent_seq_len(self.sample_rate, self.duration, self.audio_dim)
        self._warned_ids: set[str] = set()  # read failures repeat every epoch/repeat: warn once per id
        self._shards = ShardReader()  # packed rows: the shards open in this process

    def __len__(self) -> int:
        return len(self.rows) * self.repeat_factor

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        row = self.rows[index % len(self.rows)]
        try:
            wave = load_audio(row.audio_path, self.sample_rate)
            loudness = integrated_loudness(wave, self.sample_rate) if self.measure_loudness else None
            if loudness is not None and not math.isfinite(loudness) and not self._warned_loudness:
                self._warned_loudness = True
                log.warning("id %r (%s): no measurable loudness (shorter than one 0.4 s BS.1770 block): rows like "
                            "it give the loudness head (model.level_head) no target; not repeated",
                            row.sample_id, row.audio_path)
            tokens = lift_to_tokens(wave, row.audio_path, self.sample_rate, self.duration, audio_dim=self.audio_dim,
                                    audio_scale=self.audio_scale)
            if tuple(tokens.shape) != (self.num_tokens, self.audio_dim):
                raise FeatureError(f"audio tokens have shape {tuple(tokens.shape)}, expected {(self.num_tokens, self.audio_dim)}")
            feats = load_features(row, self.shapes, self._shards)
        except Exception as exc:  # one bad file must never stop a rank; the trainer counts it
            if row.sample_id not in self._warned_ids:
                self._warned_ids.add(row.sample_id)
                log.warning(
                    "skipping id %r at read time (%s): %s (not repeated for this id; failures are counted per epoch)",
                    row.sample_id, row.audio_path, exc,
                )
            return {FAILED_KEY: (row.sample_id, f"{type(exc).__name__}: {exc}")}
        item = {
            "id": row.sample_id,
            "audio_tokens": tokens.float(),
            **feats,
            "video_exist": torch.tensor(row.video_exist),
            "text_exist": torch.tensor(row.text_exist),
        }
        if loudness is not None:
            item["loudness_lufs"] = torch.tensor(loudness, dtype=torch.float32)
        return item


def collate_train(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack the tensors and list the rest of the rows that were read; `failed_rows` lists
    (id, reason) of those that were not."""
    kept = [it for it in items if FAILED_KEY not in it]
    batch: dict[str, Any] = {"failed_rows": [it[FAILED_KEY] for it in items if FAILED_KEY in it]}
    if not kept:
        return batch
    for key in kept[0]:
        values = [it[key] for it in kept]
        batch[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return batch
