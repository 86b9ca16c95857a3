"""Feature-quality report and per-dimension feature statistics of an extracted set.

    python -m wavflow.features.report --csv <training csv> [--meta CSV] [--json] [--max-rows N]

Degenerate conditioning features are the first thing to rule out when a model ignores its
conditions. Per stream (`text_features`, `clip_features`, `sync_features`, as named in the
feature files) the report gives:

- `mean_cosine`: mean cosine similarity between the flattened features of two different clips
  (near 1: the stream is nearly the same for every clip);
- `effective_rank`: participation ratio (sum l)^2 / sum l^2 of the token covariance spectrum;
- `time_variance_share`: share of the variance that varies over time (token position) within a
  clip, against the variance of the clip means across clips;
- `across_clip_rel_std`: std of the clip means across clips, relative to the feature RMS;
- with a `label` column (in the CSV or `--meta`): leave-one-out nearest-neighbour class
  accuracy of the time-averaged, centred features, beside its chance level sum_c p_c^2;
- with an `onsets` column (space-separated seconds): for `sync_features`, how often the largest
  change between consecutive tokens of a segment lies within one token of an onset, beside the
  chance level of a change position drawn at random.

The same pass accumulates per-dimension mean and std over every row (`FeatureStats`): the
statistics the optional feature normalisation uses (docs/encoders.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from wavflow.errors import CheckpointError, ManifestError, RowsFailedError, WavFlowError
from wavflow.exit_codes import JobArgumentParser, run_job
from wavflow.features.packed import KEY_COLUMN, read_row_features, ShardReader
from wavflow.io_utils import atomic_torch_save, safe_torch_load
from wavflow.manifest import read_manifest

STREAMS = ("text_features", "clip_features", "sync_features")
STATS_FILENAME = "feature_stats.pt"
STATS_VERSION = 1
# A stream is flagged as near-constant across clips beyond these.
MAX_MEAN_COSINE = 0.99
MIN_ACROSS_REL_STD = 0.01
# Synchformer token timing: 25 fps frames, 16-frame segments every 8 frames, 2 frames a token.
SYNC_FPS = 25.0
SYNC_SEGMENT_STRIDE = 8
SYNC_FRAMES_PER_TOKEN = 2
SYNC_TOKENS_PER_SEGMENT = 8


# ------------------------------------------------------------------------------ statistics
@dataclass
class _Moments:
    total: torch.Tensor  # (D,) float64 sums
    total_sq: torch.Tensor
    tokens: int = 0
    rows: int = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.double()
        self.total += x.sum(0)
        self.total_sq += (x * x).sum(0)
        self.tokens += x.shape[0]
        self.rows += 1


@dataclass
class FeatureStats:
    """Per-dimension mean/std of each stream, and the encoders that made the features."""

    encoder_identity: str
    streams: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # name -> mean, std
    tokens: dict[str, int] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)

    @staticmethod
    def from_moments(encoder_identity: str, moments: Mapping[str, _Moments]) -> "FeatureStats":
        stats = FeatureStats(encoder_identity)
        for name, m in moments.items():
            if m.tokens == 0:
                continue
            mean = m.total / m.tokens
            var = (m.total_sq / m.tokens - mean * mean).clamp_min(0.0)
            stats.streams[name] = {"mean": mean.float(), "std": var.sqrt().float()}
            stats.tokens[name], stats.rows[name] = m.tokens, m.rows
        return stats

    def to_dict(self) -> dict[str, Any]:
        return {"version": STATS_VERSION, "encoder_identity": self.encoder_identity, "streams": self.streams,
                "tokens": self.tokens, "rows": self.rows}

    @staticmethod
    def from_dict(data: Any, where: str) -> "FeatureStats":
        if not isinstance(data, Mapping) or data.get("version") != STATS_VERSION:
            raise CheckpointError(f"{where} is not a WavFlow feature-statistics file (version {STATS_VERSION})")
        stats = FeatureStats(str(data["encoder_identity"]))
        for name, s in dict(data["streams"]).items():
            mean, std = s["mean"], s["std"]
            if not (torch.is_tensor(mean) and torch.is_tensor(std) and mean.shape == std.shape and mean.ndim == 1):
                raise CheckpointError(f"{where}: stream {name} needs 1-D 'mean' and 'std' tensors of one shape")
            stats.streams[str(name)] = {"mean": mean.float(), "std": std.float()}
        stats.tokens = {str(k): int(v) for k, v in dict(data.get("tokens", {})).items()}
        stats.rows = {str(k): int(v) for k, v in dict(data.get("rows", {})).items()}
        return stats

    def save(self, path: Path) -> None:
        atomic_torch_save(self.to_dict(), path)

    @staticmethod
    def load(path: Path) -> "FeatureStats":
        return FeatureStats.from_dict(safe_torch_load(path, what="feature statistics"), str(path))

    @staticmethod
    def merge(parts: Sequence["FeatureStats"], where: str) -> "FeatureStats":
        """Pool several sets' statistics (weighted by token counts); one encoder identity only."""
        identities = sorted({p.encoder_identity for p in parts})
        if len(identities) != 1:
            raise ManifestError(f"{where}: feature statistics come from different encoders: {identities}")
        out = FeatureStats(identities[0])
        for name in STREAMS:
            have = [p for p in parts if name in p.streams]
            if not have:
                continue
            n = sum(p.tokens[name] for p in have)
            mean = sum(p.streams[name]["mean"].double() * p.tokens[name] for p in have) / n
            second = sum((p.streams[name]["std"].double() ** 2 + p.streams[name]["mean"].double() ** 2)
                         * p.tokens[name] for p in have) / n
            out.streams[name] = {"mean": mean.float(), "std": (second - mean**2).clamp_min(0).sqrt().float()}
            out.tokens[name] = n
            out.rows[name] = sum(p.rows[name] for p in have)
        return out


def identity_tag(identity: str) -> float:
    """A 52-bit hash of an encoder identity, exactly representable in float64 (stored in models)."""
    return float(int(hashlib.sha1(identity.encode()).hexdigest()[:13], 16))


# --------------------------------------------------------------------------------- metrics
def _mean_cosine(flat: torch.Tensor) -> float:
    v = torch.nn.functional.normalize(flat, dim=1)
    g = v @ v.T
    n = g.shape[0]
    return float((g.sum() - g.diagonal().sum()) / (n * (n - 1)))


def _effective_rank(tokens: torch.Tensor) -> float:
    centred = tokens - tokens.mean(0, keepdim=True)
    # eigenvalues of the covariance = squared singular values of the centred token matrix
    s = torch.linalg.svdvals(centred)
    lam = s * s
    return float(lam.sum() ** 2 / (lam * lam).sum().clamp_min(1e-30))


def _nn_accuracy(vectors: torch.Tensor, labels: Sequence[str]) -> tuple[float, float]:
    v = vectors - vectors.mean(0, keepdim=True)
    v = torch.nn.functional.normalize(v, dim=1)
    sim = v @ v.T
    sim.fill_diagonal_(-math.inf)
    nearest = sim.argmax(1).tolist()
    acc = float(np.mean([labels[j] == labels[i] for i, j in enumerate(nearest)]))
    _, counts = np.unique(labels, return_counts=True)
    p = counts / counts.sum()
    return acc, float((p * p).sum())


def sync_token_start_times(num_tokens: int) -> np.ndarray:
    """Start time (s) of each Synchformer token, segment-major as in the feature files."""
    k = np.arange(num_tokens)
    seg, pos = k // SYNC_TOKENS_PER_SEGMENT, k % SYNC_TOKENS_PER_SEGMENT
    return (seg * SYNC_SEGMENT_STRIDE + pos * SYNC_FRAMES_PER_TOKEN) / SYNC_FPS


def _sync_onset_hits(feats: Sequence[torch.Tensor], onsets: Sequence[Sequence[float]]) -> tuple[float, float, int]:
    """(hit rate, chance, clips): largest in-segment change within one token of an onset."""
    tol = SYNC_FRAMES_PER_TOKEN / SYNC_FPS + 1e-6
    # the per-position pattern every clip shares (position embeddings of the encoder) is removed first
    stack = torch.stack([f.double() for f in feats])  # (n, T, D)
    stack = stack - stack.mean(0, keepdim=True)
    t = stack.shape[1]
    starts = sync_token_start_times(t)
    hits, chances = [], []
    for x, clip_onsets in zip(stack, onsets):
        if not clip_onsets:
            continue
        seg = x.reshape(-1, SYNC_TOKENS_PER_SEGMENT, x.shape[-1])
        change = (seg[:, 1:] - seg[:, :-1]).norm(dim=-1).reshape(-1)  # (segments * 7,)
        at = starts.reshape(-1, SYNC_TOKENS_PER_SEGMENT)[:, 1:].reshape(-1)  # time of each change
        near = np.array([min(abs(a - o) for o in clip_onsets) <= tol for a in at])
        hits.append(bool(near[int(change.argmax())]))
        chances.append(float(near.mean()))
    if not hits:
        return float("nan"), float("nan"), 0
    return float(np.mean(hits)), float(np.mean(chances)), len(hits)


def stream_report(name: str, feats: Sequence[torch.Tensor], labels: Sequence[str] | None,
                  onsets: Sequence[Sequence[float]] | None) -> dict[str, Any]:
    """Metrics of one stream from per-clip feature tensors (T, D) of equal shape."""
    stack = torch.stack([f.double() for f in feats])  # (n, T, D)
    n = stack.shape[0]
    out: dict[str, Any] = {"clips": n, "shape": list(stack.shape[1:])}
    tokens = stack.reshape(-1, stack.shape[-1])
    clip_means = stack.mean(1)
    within = float(stack.var(1, unbiased=False).sum(-1).mean())
    across = float(clip_means.var(0, unbiased=False).sum()) if n > 1 else 0.0
    rms = float(tokens.pow(2).sum(-1).mean().sqrt())
    out["effective_rank"] = _effective_rank(tokens)
    out["time_variance_share"] = within / (within + across) if within + across > 0 else float("nan")
    out["across_clip_rel_std"] = math.sqrt(across) / rms if rms > 0 else 0.0
    out["mean_cosine"] = _mean_cosine(stack.reshape(n, -1)) if n > 1 else float("nan")
    warn = []
    if n > 1 and out["mean_cosine"] > MAX_MEAN_COSINE:
        warn.append(f"mean cosine between clips {out['mean_cosine']:.4f} > {MAX_MEAN_COSINE}")
    if n > 1 and out["across_clip_rel_std"] < MIN_ACROSS_REL_STD:
        warn.append(f"clip means vary by {out['across_clip_rel_std']:.2e} of the feature norm")
    if warn:
        out["warning"] = (f"{name} is near-constant across clips ({'; '.join(warn)}): wrong or missing encoder "
                          "weights, or a broken decoder? A model cannot follow a condition that does not vary")
    if labels is not None and n > 2 and len(set(labels)) > 1:
        out["nn_class_accuracy"], out["nn_class_chance"] = _nn_accuracy(clip_means, labels)
    if onsets is not None and name == "sync_features" and stack.shape[1] % SYNC_TOKENS_PER_SEGMENT == 0:
        rate, chance, clips = _sync_onset_hits(feats, onsets)
        if clips:
            out["onset_change_hit_rate"], out["onset_change_chance"], out["onset_clips"] = rate, chance, clips
    return out


# ------------------------------------------------------------------------------- the pass
def _parse_onsets(value: Any) -> list[float]:
    text = str(value).strip()
    return [float(v) for v in text.replace(",", " ").split()] if text else []


def _flag(value: Any) -> bool:
    return str(value).strip() not in ("0", "false", "False", "")


LISTED_UNREADABLE = 5  # unreadable feature files named in the report (all are counted)


def analyse_csv(csv_path: Path, *, meta: pd.DataFrame | None = None, max_rows: int = 512, seed: int = 0,
                encoder_identity: str = "unknown", progress: bool = True,
                data_root: Path | None = None) -> tuple[dict[str, Any], FeatureStats]:
    """Read every feature file of a training CSV once: statistics over all rows, the report over
    at most `max_rows` rows (a seeded random subset)."""
    # read_manifest: a file that is not a CSV, or lacks the columns, is a ManifestError naming it
    df = read_manifest(csv_path, ("id", "features_path"), optional=(KEY_COLUMN,))
    shards = ShardReader()  # rows of a packed CSV (wavflow.features.packed)
    extra = meta if meta is not None else df
    labels = dict(zip(extra["id"], extra["label"])) if "label" in extra.columns else None
    onsets = {i: _parse_onsets(o) for i, o in zip(extra["id"], extra["onsets"])} if "onsets" in extra.columns else None
    picked = set(np.random.default_rng(seed).permutation(len(df))[:max_rows].tolist())
    moments: dict[str, _Moments] = {}
    kept: dict[str, list[tuple[str, torch.Tensor]]] = {s: [] for s in STREAMS}
    unreadable: list[tuple[str, str]] = []  # (id, why) of feature files that do not load
    rows = tqdm(df.itertuples(index=False), total=len(df), desc="feature report", disable=not progress, leave=False)
    for pos, row in enumerate(rows):
        path = Path(row.features_path)
        if not path.is_absolute() and data_root is not None:
            path = data_root / path
        try:
            feats = read_row_features(path, str(getattr(row, KEY_COLUMN)).strip(), shards, str(row.id))
        except WavFlowError as exc:
            unreadable.append((str(row.id), str(exc)))
            continue
        video = _flag(getattr(row, "video_exist", "1"))
        text = _flag(getattr(row, "text_exist", "1"))
        for name in STREAMS:
            x = feats.get(name)
            wanted = text if name == "text_features" else video
            if not wanted or not torch.is_tensor(x) or x.ndim != 2 or not x.is_floating_point():
                continue
            x = x.float()
            m = moments.get(name)
            if m is None:
                m = moments[name] = _Moments(torch.zeros(x.shape[1], dtype=torch.float64),
                                             torch.zeros(x.shape[1], dtype=torch.float64))
            if x.shape[1] != m.total.shape[0]:
                continue
            m.add(x)
            if pos in picked:
                kept[name].append((str(row.id), x))
    report: dict[str, Any] = {"csv": str(csv_path), "rows": len(df), "unreadable": len(unreadable),
                              "max_rows": max_rows, "streams": {}, "warnings": []}
    if unreadable:  # named, never only counted: the report of the other rows says nothing of them
        first = "; ".join(f"{rid!r}: {why}" for rid, why in unreadable[:3])
        report["unreadable_first"] = [list(item) for item in unreadable[:LISTED_UNREADABLE]]
        report["warnings"].append(f"{len(unreadable)} of {len(df)} feature file(s) could not be read, "
                                  f"left out of the report; first: {first}")
    for name in STREAMS:
        items = kept[name]
        if not items:
            continue
        shape = items[0][1].shape
        items = [(i, x) for i, x in items if x.shape == shape]
        ids = [i for i, _ in items]
        lab = [labels.get(i, "") for i in ids] if labels is not None else None
        if lab is not None and any(v == "" for v in lab):
            lab = None  # a label for every clip, or no label metric
        ons = [onsets.get(i, []) for i in ids] if onsets is not None else None
        entry = stream_report(name, [x for _, x in items], lab, ons)
        report["streams"][name] = entry
        if "warning" in entry:
            report["warnings"].append(entry["warning"])
    return report, FeatureStats.from_moments(encoder_identity, moments)


def format_report(report: Mapping[str, Any]) -> str:
    lines = [f"feature report of {report['csv']} ({report['rows']} rows, report on up to {report['max_rows']})"]
    header = f"{'stream':15s} {'clips':>5s} {'mean cos':>8s} {'eff rank':>8s} {'time var':>8s} {'across':>8s}  extra"
    lines.append(header)
    for name, s in report["streams"].items():
        extra = []
        if "nn_class_accuracy" in s:
            extra.append(f"1-NN class acc {s['nn_class_accuracy']:.2f} (chance {s['nn_class_chance']:.2f})")
        if "onset_change_hit_rate" in s:
            extra.append(f"largest change at an onset {s['onset_change_hit_rate']:.2f} "
                         f"(chance {s['onset_change_chance']:.2f})")
        lines.append(f"{name:15s} {s['clips']:5d} {s['mean_cosine']:8.4f} {s['effective_rank']:8.2f} "
                     f"{s['time_variance_share']:8.3f} {s['across_clip_rel_std']:8.2e}  {'; '.join(extra)}")
    lines += [f"WARNING: {w}" for w in report["warnings"]]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    return run_job("features.report", lambda: _report(_parse(argv)))


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = JobArgumentParser(prog="python -m wavflow.features.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--csv", required=True, help="training CSV (extraction output)")
    parser.add_argument("--meta", help="optional CSV with id and label and/or onsets columns")
    parser.add_argument("--max-rows", type=int, default=512, help="clips the pairwise metrics use")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--write-stats", action="store_true",
                        help=f"also write {STATS_FILENAME} (for data.feature_norm) into the features' folder")
    parser.add_argument("--encoder-identity", default="unknown",
                        help="names the encoders in the statistics file (extraction records its own)")
    return parser.parse_args(argv)


def _report(args: argparse.Namespace) -> int:
    for flag, path in (("--csv", args.csv), ("--meta", args.meta)):
        if path and Path(path).is_dir():
            raise ManifestError(f"{flag} {path} is a directory, not a CSV file")
        if path and not Path(path).is_file():
            raise ManifestError(f"{flag} {path}: no such file")
    meta = None
    if args.meta:
        meta = read_manifest(args.meta, ("id",))
    report, stats = analyse_csv(Path(args.csv), meta=meta, max_rows=args.max_rows, progress=not args.json,
                                encoder_identity=args.encoder_identity)
    if report["rows"] and report["unreadable"] == report["rows"]:  # an empty report is no success
        print(json.dumps(report, indent=1) if args.json else format_report(report))
        first = report["unreadable_first"][0]
        raise RowsFailedError(f"every feature file of {args.csv} failed to load ({report['rows']} row(s)); "
                              f"first: {first[0]!r}: {first[1]}")
    if args.write_stats:
        folders = {Path(p).parent for p in pd.read_csv(args.csv, dtype=str)["features_path"]}
        if len(folders) != 1:
            raise ManifestError(f"--write-stats: the features of {args.csv} lie in {len(folders)} folders, not one")
        stats.save(folders.pop() / STATS_FILENAME)
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
