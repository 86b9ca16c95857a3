"""The up-front check of every training row's feature file (`data.validate_features`), with the
files that passed remembered in the run folder, so that a resumed or restarted run re-reads only
the files that changed since (TRAINING.md, "Large data sets").

Rows of a packed store (a `features_key`) are checked from their shard's header, which lists
every tensor's dtype and shape: one read per shard, at every start, never recorded; the packer
stored only finite float tensors, and the values are checked again when read.

A file counts as unchanged when its size and modification time (ns) equal those it had when it
passed, under the same expected shapes and the same modality flags of its row. Files that failed
are never remembered: they are checked, and reported, at every start.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from tqdm import tqdm

from wavflow.errors import FeatureError
from wavflow.features.packed import FEATURE_KEYS, read_index, tensor_name, tensor_problem, TensorInfo
from wavflow.io_utils import atomic_write_text
from wavflow.shapes import FeatureShapes
from wavflow.train.dataset import TrainRow, load_features

log = logging.getLogger("wavflow.train")

CHECKS_NAME = "feature_checks.json"  # in the run folder
CHECKS_FORMAT = 1

Stamp = list[int]  # [size in bytes, modification time in ns]


def file_stamp(path: Path) -> Optional[Stamp]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [int(st.st_size), int(st.st_mtime_ns)]


def row_key(row: TrainRow) -> str:
    """What a verdict holds for: the file and which of its tensors the row needs."""
    return f"{int(row.video_exist)}{int(row.text_exist)}:{row.features_path}"


def _shapes_key(shapes: FeatureShapes) -> list[list[int]]:
    return [list(shapes.clip), list(shapes.sync), list(shapes.text)]


@dataclass
class PassedFiles:
    """Feature files that passed the check, by row_key, with their stamps then."""

    shapes: FeatureShapes
    stamps: dict[str, Stamp] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Optional[Path], shapes: FeatureShapes) -> "PassedFiles":
        """The record at `path`, or an empty one (no file, another format or other shapes). A
        record that cannot be read is ignored with a warning: every file is then checked."""
        if path is None or not path.is_file():
            return cls(shapes)
        try:
            saved = json.loads(path.read_text())
            valid = (isinstance(saved, dict) and saved.get("format") == CHECKS_FORMAT
                     and isinstance(saved.get("files"), dict))
        except (OSError, ValueError) as exc:
            log.warning("%s could not be read (%s): every feature file is checked again", path, exc)
            return cls(shapes)
        if not valid or saved.get("shapes") != _shapes_key(shapes):
            return cls(shapes)
        # an entry that is not [size, mtime] never matches a stamp: its file is read again
        return cls(shapes, {str(k): v for k, v in saved["files"].items() if isinstance(v, list)})

    def unchanged(self, row: TrainRow, stamp: Optional[Stamp]) -> bool:
        return stamp is not None and self.stamps.get(row_key(row)) == stamp

    def save(self, path: Path) -> None:
        atomic_write_text(path, json.dumps({"format": CHECKS_FORMAT, "shapes": _shapes_key(self.shapes),
                                            "files": self.stamps}))


def check_feature_files(rows: Sequence[TrainRow], shapes: FeatureShapes, known: PassedFiles,
                        show_progress: bool) -> tuple[dict[int, str], dict[str, Stamp], int]:
    """({position in rows: reason} of the rows whose feature file is unreadable or mis-shaped,
    the stamps of the files that passed, how many of them were known unchanged and not read)."""
    problems: dict[int, str] = {}
    passed: dict[str, Stamp] = {}
    skipped = 0
    indexes: dict[Path, dict[str, TensorInfo] | str] = {}  # each shard's header, or why it cannot be read
    for pos in tqdm(range(len(rows)), desc="check features", disable=not show_progress, leave=False):
        row = rows[pos]
        if row.packed:
            problem = packed_row_problem(row, shapes, indexes)
            if problem:
                problems[pos] = problem
            continue
        stamp = file_stamp(row.features_path)  # taken first: a file changed while it is read is read again next time
        if known.unchanged(row, stamp):
            skipped += 1
        else:
            try:
                load_features(row, shapes)
            except FeatureError as exc:
                problems[pos] = str(exc)
                continue
        if stamp is not None:
            passed[row_key(row)] = stamp
    return problems, passed, skipped


def packed_row_problem(row: TrainRow, shapes: FeatureShapes,
                       indexes: dict[Path, dict[str, TensorInfo] | str]) -> Optional[str]:
    """What is wrong with a packed row's needed tensors, from its shard's header (read once)."""
    if row.features_path not in indexes:
        try:
            indexes[row.features_path] = read_index(row.features_path)
        except FeatureError as exc:
            indexes[row.features_path] = str(exc)
    index = indexes[row.features_path]
    if isinstance(index, str):
        return index
    if not any(tensor_name(row.features_key, key) in index for key in FEATURE_KEYS):
        return f"feature shard {row.features_path} holds no row {row.features_key!r} (features_key of id {row.sample_id!r})"
    needed = [("clip_features", shapes.clip, row.video_exist), ("sync_features", shapes.sync, row.video_exist),
              ("text_features", shapes.text, row.text_exist)]
    found = [p for key, want, exists in needed if exists
             and (p := tensor_problem(index, row.features_key, key, want)) is not None]
    if found:
        return f"feature shard {row.features_path} row (id {row.sample_id!r}): {'; '.join(found)}"
    return None


def find_feature_problems(rows: Sequence[TrainRow], shapes: FeatureShapes, show_progress: bool) -> dict[int, str]:
    """{position in rows: reason} for rows whose feature file is unreadable or mis-shaped (all read)."""
    return check_feature_files(rows, shapes, PassedFiles(shapes), show_progress)[0]
