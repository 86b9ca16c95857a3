"""Pair generated wavs with reference rows by id; name every id missing on either side.

* Generated side: `<dir>/summary.csv` (the predict job's) when present: its `ok` /
  `skipped_exists` rows give id -> wav_path, its `failed` rows are reported as missing with the
  predict reason. Without a summary, every `<dir>/*.wav` is one id (its stem).
* Reference side: a CSV `id,audio_path[,video_path][,caption]`; relative paths resolve
  against `data_root` when set, else against the CSV's folder.
* Modes: from the inference CSV (`video_exist` / `text_exist`), with the predict job's own id
  rule (id column, else video stem, else row_NNNNN, de-duplicated); without it every pair is in
  `overall` only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from wavflow.errors import ManifestError
from wavflow.infer_rows import read_rows
from wavflow.manifest import read_manifest, resolve_path

MODES = ("VT2A", "T2A", "V2A")


@dataclass
class Pair:
    id: str
    generated: Path
    reference: Path
    video: Path | None = None
    caption: str | None = None
    mode: str | None = None  # VT2A / T2A / V2A / unconditional, None without an inference CSV


@dataclass
class Pairing:
    pairs: list[Pair]
    missing_generated: dict[str, str] = field(default_factory=dict)  # id -> why (reference has it)
    missing_reference: dict[str, str] = field(default_factory=dict)  # id -> why (generated has it)
    unreadable: dict[str, str] = field(default_factory=dict)  # id -> which side and why (filled later)
    not_in_infer_csv: list[str] = field(default_factory=list)

    def report(self) -> dict[str, object]:
        return {
            "paired": len(self.pairs),
            "missing_generated": dict(sorted(self.missing_generated.items())),
            "missing_reference": dict(sorted(self.missing_reference.items())),
            "unreadable": dict(sorted(self.unreadable.items())),
            "not_in_infer_csv": sorted(self.not_in_infer_csv),
        }


def _generated(gen_dir: Path) -> tuple[dict[str, Path], dict[str, str]]:
    """id -> wav, and id -> reason for ids the predict job did not produce."""
    if gen_dir.exists() and not gen_dir.is_dir():
        raise ManifestError(f"generated folder {gen_dir} is a file, not a folder: give the predict job's "
                            "output.output_dir")
    if not gen_dir.is_dir():
        raise ManifestError(f"generated folder not found: {gen_dir}")
    summary = gen_dir / "summary.csv"
    found: dict[str, Path] = {}
    failed: dict[str, str] = {}
    if summary.is_file():
        df = read_manifest(summary, ("id", "status", "wav_path"), optional=("reason",))
        for _, row in df.iterrows():
            rid = row["id"].strip()
            if row["status"].strip() == "failed":
                failed[rid] = f"predict failed: {row['reason'].strip() or 'no reason given'}"
                continue
            wav = Path(row["wav_path"].strip()) if row["wav_path"].strip() else gen_dir / f"{rid}.wav"
            found[rid] = wav if wav.is_absolute() else gen_dir / wav
        return found, failed
    for wav in sorted(gen_dir.glob("*.wav")):
        found[wav.stem] = wav
    if not found:
        raise ManifestError(f"generated folder {gen_dir} holds no summary.csv and no .wav files")
    return found, failed


def _reference(csv_path: Path, data_root: str | None) -> dict[str, tuple[Path, Path | None, str | None]]:
    df = read_manifest(csv_path, ("id", "audio_path"), optional=("video_path", "caption"))
    root = data_root or str(csv_path.parent)
    out: dict[str, tuple[Path, Path | None, str | None]] = {}
    for line, (_, row) in enumerate(df.iterrows(), start=2):
        rid = row["id"].strip()
        if not rid:
            raise ManifestError(f"reference CSV {csv_path} line {line}: empty id")
        if rid in out:
            raise ManifestError(f"reference CSV {csv_path} line {line}: duplicate id {rid!r}")
        video = row["video_path"].strip()
        caption = row["caption"].strip()
        out[rid] = (resolve_path(row["audio_path"].strip(), root), resolve_path(video, root) if video else None,
                    caption or None)
    return out


def _modes(infer_csv: Path, data_root: str | None) -> dict[str, tuple[str, Path | None, str | None]]:
    """id -> (mode, video, caption) as the predict job named and read the rows."""
    rows = read_rows(infer_csv, data_root or str(infer_csv.parent))
    return {r.name: (r.kind, r.video, r.caption) for r in rows}


def pair_by_id(gen_dir: str | os.PathLike, reference_csv: str | os.PathLike, infer_csv: str | os.PathLike | None = None,
               data_root: str | None = None) -> Pairing:
    """Pairs for every id on both sides; ids on one side only are reported, not dropped silently.

    Video and caption come from the reference CSV, else from the inference CSV's row.
    """
    generated, failed = _generated(Path(gen_dir))
    reference = _reference(Path(reference_csv), data_root)
    modes = _modes(Path(infer_csv), data_root) if infer_csv else None
    result = Pairing(pairs=[])
    for rid in sorted(set(reference) | set(generated) | set(failed)):
        if rid not in reference:
            if rid in generated:
                result.missing_reference[rid] = "id not in the reference CSV"
            continue
        if rid not in generated:
            result.missing_generated[rid] = failed.get(rid, "no generated wav for this id")
            continue
        audio, video, caption = reference[rid]
        pair = Pair(rid, generated[rid], audio, video, caption)
        if modes is not None:
            if rid in modes:
                mode, infer_video, infer_caption = modes[rid]
                pair.mode = mode
                # the conditions the clip was generated from fill what the reference CSV lacks
                pair.video = pair.video or (infer_video if mode in ("VT2A", "V2A") else None)
                pair.caption = pair.caption or (infer_caption if mode in ("VT2A", "T2A") else None)
            else:
                result.not_in_infer_csv.append(rid)
        result.pairs.append(pair)
    return result
