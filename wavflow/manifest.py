"""CSV manifests: read, check columns/ids/flags/paths, and report every bad row at once.

The schemas (docs/design.md §3):
- extraction input: `id,audio_path,caption` (T2A) or `id,audio_path,video_path,caption` (VT2A)
- training input (= extraction output): `id,audio_path,features_path,video_exist,text_exist`
- inference input: `video_path,caption,video_exist,text_exist` (+ optional `id`, `features_path`)
Each job validates its own schema with these helpers and decides whether bad rows are fatal.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd

from wavflow.errors import ManifestError
from wavflow.io_utils import check_safe_id

EXTRACT_T2A_COLUMNS = ("id", "audio_path", "caption")
EXTRACT_VT2A_COLUMNS = ("id", "audio_path", "video_path", "caption")
TRAIN_COLUMNS = ("id", "audio_path", "features_path", "video_exist", "text_exist")
INFER_COLUMNS = ("video_path", "caption", "video_exist", "text_exist")


@dataclass(frozen=True)
class RowProblem:
    """One bad row: `line` is the 1-based line in the CSV file (header = line 1)."""

    line: int
    row_id: str
    reason: str

    def __str__(self) -> str:
        return f"line {self.line} (id {self.row_id!r}): {self.reason}"


@dataclass
class ManifestReport:
    """All problems found in one CSV; `bad_rows` are DataFrame index labels to drop."""

    path: Path
    problems: list[RowProblem] = field(default_factory=list)
    bad_rows: set[int] = field(default_factory=set)

    def add(self, index: int, row_id: str, reason: str) -> None:
        self.problems.append(RowProblem(line=int(index) + 2, row_id=row_id, reason=reason))
        self.bad_rows.add(int(index))

    def format(self, limit: int = 50) -> str:
        # The head line is the one a job's error message ends with: it names the first bad row.
        head = f"{len(self.problems)} problem(s) in {self.path} ({len(self.bad_rows)} bad row(s))"
        lines = [f"{head}; first: {self.problems[0]}" if self.problems else head]
        lines += [f"  - {p}" for p in self.problems[:limit]]
        if len(self.problems) > limit:
            lines.append(f"  ... and {len(self.problems) - limit} more")
        return "\n".join(lines)

    def raise_if_any(self) -> None:
        if self.problems:
            raise ManifestError(self.format())


def read_manifest(
    path: str | os.PathLike, required: Sequence[str], optional: Sequence[str] = ()
) -> pd.DataFrame:
    """Read a CSV with every cell as a string (no NaN guessing, quoted commas kept).

    Missing required columns raise ManifestError naming the file and the columns. Absent
    optional columns are added as empty strings so callers need not special-case them.
    """
    path = Path(path)
    if path.is_dir():
        raise ManifestError(f"CSV {path} is a directory, not a CSV file")
    if not path.is_file():
        raise ManifestError(f"CSV not found: {path}")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False, skipinitialspace=False)
    except Exception as exc:
        raise ManifestError(f"CSV {path} could not be parsed: {exc}") from exc
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ManifestError(
            f"CSV {path} is missing column(s) {', '.join(missing)}; "
            f"found {', '.join(df.columns) or 'none'}; required {', '.join(required)}"
        )
    for col in optional:
        if col not in df.columns:
            df[col] = ""
    return df


def resolve_path(value: str, data_root: str | os.PathLike | None) -> Path:
    """Relative paths resolve against `data_root` when it is set; the result is absolute."""
    p = Path(os.path.expanduser(value))
    if not p.is_absolute() and data_root:
        p = Path(data_root) / p
    return p.absolute()


def check_ids(
    df: pd.DataFrame, report: ManifestReport, column: str = "id", seen: dict[str, tuple[Path, int]] | None = None
) -> None:
    """Empty, unsafe (path separators, '..') and duplicate ids.

    Pass the same `seen` dict (id -> (csv path, line)) for several CSVs that form one data set
    to find duplicates across them too.
    """
    seen = {} if seen is None else seen
    for idx, value in df[column].items():
        try:
            check_safe_id(value)
        except ManifestError as exc:
            report.add(idx, value, str(exc))
            continue
        if value in seen:
            where, line = seen[value]
            place = f"line {line}" if where == report.path else f"{where} line {line}"
            report.add(idx, value, f"duplicate id (first {'on' if where == report.path else 'in'} {place})")
        else:
            seen[value] = (report.path, int(idx) + 2)


def parse_flag(value: str) -> int | None:
    """'0'/'1' (also '0.0', '1.0', 'true'/'false') -> 0/1; anything else -> None."""
    v = value.strip().lower()
    if v in ("1", "1.0", "true"):
        return 1
    if v in ("0", "0.0", "false"):
        return 0
    return None


def check_flags(df: pd.DataFrame, report: ManifestReport, columns: Iterable[str], id_column: str = "id") -> None:
    for col in columns:
        for idx, value in df[col].items():
            if parse_flag(value) is None:
                report.add(idx, _row_id(df, idx, id_column), f"{col}={value!r} is not 0 or 1")


def check_files(
    df: pd.DataFrame,
    report: ManifestReport,
    column: str,
    data_root: str | os.PathLike | None,
    *,
    only_if: pd.Series | None = None,
    id_column: str = "id",
) -> None:
    """Report rows whose `column` path is empty, does not exist, or is relative and leaves
    `data_root` through '..' (optionally only where `only_if`). An absolute path is the user's
    explicit choice and may point anywhere."""
    for idx, value in df[column].items():
        if only_if is not None and not bool(only_if.loc[idx]):
            continue
        if not value.strip():
            report.add(idx, _row_id(df, idx, id_column), f"{column} is empty")
        elif (escape := _leaves_root(value, data_root)) is not None:
            report.add(idx, _row_id(df, idx, id_column), escape.format(column=column))
        elif not resolve_path(value, data_root).is_file():
            report.add(idx, _row_id(df, idx, id_column), f"{column} not found: {resolve_path(value, data_root)}")


def _leaves_root(value: str, data_root: str | os.PathLike | None) -> str | None:
    """A message template when relative `value` climbs out of `data_root`, else None."""
    path = Path(os.path.expanduser(value))
    if not data_root or path.is_absolute():
        return None
    root = os.path.normpath(os.path.abspath(data_root))
    target = os.path.normpath(os.path.join(root, path))
    if target == root or target.startswith(root.rstrip(os.sep) + os.sep):
        return None
    return (f"{{column}} {value!r} leads outside data.data_root ({root}) through '..'; "
            "give an absolute path to read a file there")


def _row_id(df: pd.DataFrame, idx: int, id_column: str) -> str:
    if id_column in df.columns:
        return str(df.at[idx, id_column])
    return f"row_{int(idx):05d}"
