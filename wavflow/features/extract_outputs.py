"""Where an extraction run writes, and how rank 0 merges the per-rank parts.

Beside `output.csv_path` (`<dir>/<stem>.csv`):
- `<stem>_rank{r}.csv`         rows rank r produced (done or skipped), deleted after the merge
- `<stem>_errors_rank{r}.log`  `id<TAB>reason` per failed row of rank r, deleted after the merge
- `<stem>.csv`                 the merged training CSV (TRAIN_COLUMNS, absolute paths, input order)
- `<stem>_errors.log`          every failed row of the run, input order (empty file: no failures)
- `<stem>_summary.json`        done / skipped / failed counts of the run
Each run rewrites all of these: a re-run lists every row again (skipped ones included), and an
id that failed before but succeeds now is no longer in the error log.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Sequence

import pandas as pd

from wavflow.errors import ManifestError
from wavflow.io_utils import atomic_write_csv, atomic_write_text
from wavflow.manifest import TRAIN_COLUMNS


@dataclass(frozen=True)
class OutputPaths:
    csv_path: Path  # the merged training CSV (absolute)

    @property
    def directory(self) -> Path:
        return self.csv_path.parent

    @property
    def stem(self) -> str:
        return self.csv_path.stem

    def rank_csv(self, rank: int) -> Path:
        return self.directory / f"{self.stem}_rank{rank}.csv"

    def rank_errors(self, rank: int) -> Path:
        return self.directory / f"{self.stem}_errors_rank{rank}.log"

    @property
    def errors_log(self) -> Path:
        return self.directory / f"{self.stem}_errors.log"

    @property
    def summary_json(self) -> Path:
        return self.directory / f"{self.stem}_summary.json"


def _one_line(text: str) -> str:
    """Reasons go in a `id<TAB>reason` line: no tabs or newlines inside."""
    return " ".join(str(text).replace("\t", " ").split())


class RankOutputs:
    """The per-rank CSV part and error log, opened fresh for this run (context manager)."""

    def __init__(self, paths: OutputPaths, rank: int, flush_every: int) -> None:
        self.paths = paths
        self.rank = rank
        self.flush_every = max(1, flush_every)
        self._pending = 0
        paths.directory.mkdir(parents=True, exist_ok=True)
        self._csv_file: IO[str] = open(paths.rank_csv(rank), "w", newline="", encoding="utf-8")
        self._err_file: IO[str] = open(paths.rank_errors(rank), "w", encoding="utf-8")
        self._csv = csv.writer(self._csv_file)
        self._csv.writerow(TRAIN_COLUMNS)

    def add_row(self, sample_id: str, audio_path: Path, features_path: Path, video_exist: int, text_exist: int) -> None:
        self._csv.writerow([sample_id, str(audio_path), str(features_path), int(video_exist), int(text_exist)])
        self._tick()

    def add_error(self, sample_id: str, reason: str) -> None:
        self._err_file.write(f"{sample_id}\t{_one_line(reason)}\n")
        self._tick()

    def _tick(self) -> None:
        # Periodic flush: a killed run leaves readable parts for inspection.
        self._pending += 1
        if self._pending >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        for f in (self._csv_file, self._err_file):
            f.flush()
            os.fsync(f.fileno())
        self._pending = 0

    def close(self) -> None:
        if not self._csv_file.closed:
            self.flush()
            self._csv_file.close()
            self._err_file.close()

    def __enter__(self) -> "RankOutputs":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class MergeResult:
    rows: int
    errors: int


def _read_part(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise ManifestError(f"per-rank CSV part {path} is missing: did a rank fail? Re-run the extraction")
    df = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)
    if tuple(df.columns) != TRAIN_COLUMNS:
        raise ManifestError(f"per-rank CSV part {path} has columns {list(df.columns)}, expected {list(TRAIN_COLUMNS)}")
    return df


def _read_errors(path: Path) -> list[tuple[str, str]]:
    if not path.is_file():
        raise ManifestError(f"per-rank error log {path} is missing: did a rank fail? Re-run the extraction")
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            sample_id, _, reason = line.partition("\t")
            out.append((sample_id, reason))
    return out


def first_errors(path: Path, limit: int = 5) -> tuple[tuple[str, str], ...]:
    """The first `limit` (id, reason) lines of a merged error log (none when it is absent)."""
    try:
        return tuple(_read_errors(path)[:limit])
    except ManifestError:
        return ()


def merge_outputs(paths: OutputPaths, world_size: int, input_ids: Sequence[str]) -> MergeResult:
    """Rank 0, after every rank closed its parts: write the merged CSV and error log.

    Rows are deduplicated by id (first part wins) and put in input-CSV order; the parts are
    deleted once the merged files are in place.
    """
    order = {sample_id: pos for pos, sample_id in enumerate(input_ids)}
    parts = [_read_part(paths.rank_csv(r)) for r in range(world_size)]
    errors = [e for r in range(world_size) for e in _read_errors(paths.rank_errors(r))]

    merged = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=list(TRAIN_COLUMNS))
    merged = merged.drop_duplicates(subset="id", keep="first")
    merged = merged.assign(_order=merged["id"].map(lambda i: order.get(i, len(order))))
    merged = merged.sort_values("_order", kind="stable").drop(columns="_order")
    atomic_write_csv(merged[list(TRAIN_COLUMNS)], paths.csv_path)

    errors.sort(key=lambda e: order.get(e[0], len(order)))
    buf = io.StringIO()
    for sample_id, reason in errors:
        buf.write(f"{sample_id}\t{reason}\n")
    atomic_write_text(paths.errors_log, buf.getvalue())

    for r in range(world_size):
        paths.rank_csv(r).unlink(missing_ok=True)
        paths.rank_errors(r).unlink(missing_ok=True)
    return MergeResult(rows=len(merged), errors=len(errors))


def write_summary(paths: OutputPaths, summary: dict[str, Any]) -> None:
    atomic_write_text(paths.summary_json, json.dumps(summary, indent=2, sort_keys=True) + "\n")
