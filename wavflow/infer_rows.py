"""The inference CSV (`video_path,caption,video_exist,text_exist`, optional `id` and
`features_path` and `duration`; docs/method.md §5, docs/long_form.md): each row parsed into an `InferRow` with its unique output
name and its mode, bad rows failed up front. The predict job generates from these rows, and the
evaluation reads the same rows to name and group what predict wrote."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import pandas as pd

from wavflow.errors import ManifestError
from wavflow.io_utils import sanitize_filename
from wavflow.manifest import INFER_COLUMNS, parse_flag, read_manifest, resolve_path

log = logging.getLogger("wavflow.predict")

STATUS_OK, STATUS_FAILED, STATUS_SKIPPED = "ok", "failed", "skipped_exists"


@dataclass
class InferRow:
    """One CSV row after parsing; `video` / `caption` None select the learned empty tokens."""

    index: int
    name: str  # unique, file-system safe output stem
    video: Optional[Path]
    caption: Optional[str]
    features_path: Optional[Path]
    wants_video: bool = False  # video_exist=1: video conditions (from `video` or `features_path`)
    duration: Optional[float] = None  # seconds to generate (the `duration` column); None: the video's / trained length
    windows: int = 1  # windows the row was generated in (docs/long_form.md)
    output_stem: str = ""  # file stem of the outputs when it differs from `name` (input clash)
    status: str = ""
    seconds: float = 0.0
    model_calls: int = 0  # network calls of the sampler for this row's batch
    predicted_lufs: Optional[float] = None  # the loudness head's prediction (output.loudness_from_model)
    loudness_lufs: Optional[float] = None  # the loudness the clip was written at; None: left as generated
    wav_path: str = ""
    mp4_path: str = ""
    reason: str = ""

    @property
    def has_video(self) -> bool:
        return self.video is not None or self.wants_video

    @property
    def stem(self) -> str:
        return self.output_stem or self.name

    @property
    def kind(self) -> str:
        key = (self.has_video, self.caption is not None)
        return {(True, True): "VT2A", (False, True): "T2A", (True, False): "V2A"}.get(key, "unconditional")

    def fail(self, reason: str) -> None:
        self.status, self.reason = STATUS_FAILED, reason
        log.warning("row %d (%s) failed: %s", self.index, self.name, reason)


# ----------------------------------------------------------------------------- rows


def _raw_name(row: pd.Series, idx: int) -> str:
    """id, else the video stem, else row_<idx:05d> (docs/method.md §5)."""
    rid = str(row.get("id", "")).strip()
    if rid and rid.lower() != "nan":
        return rid
    video = str(row.get("video_path", "")).strip()
    if video:
        return Path(video).stem
    return f"row_{idx:05d}"


def unique_names(raw: Sequence[str]) -> list[str]:
    """Sanitise and de-duplicate output stems: 'a', 'a' -> 'a', 'a_1' (never overwrite)."""

    wanted = [sanitize_filename(r, fallback="row") for r in raw]
    reserved, taken, out = set(wanted), set(), []
    for stem in wanted:
        name, k = stem, 0
        while name in taken or (k > 0 and name in reserved):
            k += 1
            name = f"{stem}_{k}"
        taken.add(name)
        out.append(name)
    return out


def read_rows(csv_path: str | os.PathLike, data_root: Optional[str]) -> list[InferRow]:
    """Parse the inference CSV; rows with bad flags or a missing video_path are pre-failed."""

    df = read_manifest(csv_path, INFER_COLUMNS, optional=("id", "features_path", "duration"))
    if df.empty:
        raise ManifestError(f"CSV {csv_path} has a header but no rows: nothing to predict")
    names = unique_names([_raw_name(row, i) for i, (_, row) in enumerate(df.iterrows())])
    rows = []
    for i, ((_, rec), name) in enumerate(zip(df.iterrows(), names)):
        problems = []
        flags = {}
        for col in ("video_exist", "text_exist"):
            flags[col] = parse_flag(str(rec[col]))
            if flags[col] is None:
                problems.append(f"{col}={rec[col]!r} is not 0 or 1")
        video_str, caption = str(rec["video_path"]).strip(), str(rec["caption"])
        feats = str(rec["features_path"]).strip()
        video = resolve_path(video_str, data_root) if flags["video_exist"] and video_str else None
        if flags["video_exist"] and not video_str and not feats:
            problems.append("video_exist=1 but video_path and features_path are empty")
        row = InferRow(
            index=i,
            name=name,
            video=video,
            caption=caption if flags["text_exist"] else None,
            features_path=resolve_path(feats, data_root) if feats else None,
            wants_video=bool(flags["video_exist"]),
        )
        duration, problem = _parse_duration(str(rec["duration"]))
        row.duration = duration
        if problem:
            problems.append(problem)
        if problems:
            row.fail("; ".join(problems))
        elif row.video is not None and not row.video.is_file() and row.features_path is None:
            row.fail(f"video not found: {row.video}")
        elif row.features_path is not None and not row.features_path.is_file():
            row.fail(f"features_path not found: {row.features_path}")
        rows.append(row)
    return rows


def _parse_duration(text: str) -> tuple[Optional[float], str]:
    """The optional `duration` column: empty, or a positive number of seconds."""
    text = text.strip()
    if not text or text.lower() == "nan":
        return None, ""
    try:
        value = float(text)
    except ValueError:
        return None, f"duration={text!r} is not a number of seconds"
    if not (math.isfinite(value) and value > 0):
        return None, f"duration={text!r} must be a positive number of seconds"
    return value, ""
