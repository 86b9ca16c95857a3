"""Extract per-clip embeddings with every available network and compute the metrics per mode."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import Tensor

from wavflow.audio import load_audio
from wavflow.errors import WavFlowError
from wavflow.evaluate import metrics as M
from wavflow.evaluate.pairing import MODES, Pairing
from wavflow.evaluate.video_frames import decode_imagebind_frames
from wavflow.features.synchformer_av import audio_segments_mel, AUDIO_SR, make_sync_mel, offset_grid
from wavflow.video import decode_video, sync_segments

log = logging.getLogger("wavflow.evaluate")

# metric -> the network it needs
METRIC_NETWORK = {
    "FD_PaSST": "passt", "KL_PaSST": "passt", "IS_PaSST": "passt",
    "FD_PANNs": "panns", "KL_PANNs": "panns", "IS_PANNs": "panns",
    "FD_VGGish": "vggish",
    "IB_score": "imagebind",
    "DeSync": "synchformer",
    "CLAP_score": "clap",
}
ALL_METRICS = tuple(METRIC_NETWORK)
# what each metric means for the table's legend (lower / higher is better)
BETTER = {"FD_PaSST": "lower", "FD_PANNs": "lower", "FD_VGGish": "lower", "KL_PaSST": "lower",
          "KL_PANNs": "lower", "IS_PANNs": "higher", "IS_PaSST": "higher", "IB_score": "higher",
          "DeSync": "lower", "CLAP_score": "higher"}


@dataclass
class ClipFeatures:
    gen: dict[str, Any] = field(default_factory=dict)
    ref: dict[str, Any] = field(default_factory=dict)
    desync: float | None = None
    ib: float | None = None  # cosine of this clip's audio and video embeddings
    clap: float | None = None


def _cos(a: Tensor, b: Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double().reshape(1, -1), b.double().reshape(1, -1)))


class Extractor:
    """Holds the loaded networks; `clip(pair)` returns one pair's features."""

    def __init__(self, nets: Mapping[str, Any], *, device: torch.device, duration: float, desync_segments: int) -> None:
        self.nets = dict(nets)
        self.device = device
        self.duration = duration
        self.desync_segments = desync_segments
        self._sync_mel = None

    def _load(self, path: Path, sr: int) -> Tensor:
        return load_audio(path, sr)

    @staticmethod
    def _centred(wave: Tensor, sr: int, duration: float) -> Tensor:
        # the field's audio loading: mono, mean removed, first `duration` seconds
        wave = wave - wave.mean()
        return wave[: int(sr * duration)]

    @torch.inference_mode()
    def audio_features(self, path: Path, *, reference: bool) -> dict[str, Any]:
        out: dict[str, Any] = {}
        dev = self.device
        wave16 = self._load(path, 16000)  # raises AudioError for a missing / unreadable file
        w16 = self._centred(wave16, 16000, self.duration)
        if "panns" in self.nets:
            logits, emb = self.nets["panns"](w16[None].to(dev))
            out["panns_logits"], out["panns_emb"] = logits[0].cpu(), emb[0].cpu()
        if "vggish" in self.nets:
            out["vggish"] = self.nets["vggish"](w16.to(dev)).cpu()
        if "passt" in self.nets:
            w32 = self._centred(self._load(path, 32000), 32000, self.duration)
            logits, emb = self.nets["passt"](w32[None].to(dev))
            out["passt_logits"], out["passt_emb"] = logits[0].cpu(), emb[0].cpu()
        if reference:
            return out
        if "imagebind" in self.nets:
            out["ib_audio"] = self.nets["imagebind"].audio(wave16.to(dev))[0].cpu()  # whole file, as the field
        if "clap" in self.nets:
            w48 = self._centred(self._load(path, 48000), 48000, self.duration)
            out["clap_audio"] = self.nets["clap"].audio(w48[None].to(dev))[0].cpu()
        if "synchformer" in self.nets:
            out["sync_wave"] = wave16  # DeSync needs the un-centred 16 kHz wave (Synchformer's loading)
        return out

    @torch.inference_mode()
    def desync(self, wave16: Tensor, video: Path) -> float:
        need = int(AUDIO_SR * self.duration)
        if wave16.shape[-1] < need:
            raise WavFlowError(f"audio lasts {wave16.shape[-1] / AUDIO_SR:.2f} s < {self.duration} s (DeSync)")
        net = self.nets["synchformer"]
        if self._sync_mel is None:
            self._sync_mel = make_sync_mel().to(self.device)
        mel = audio_segments_mel(wave16[None, :need].to(self.device), self._sync_mel)
        frames = decode_video(video, self.duration).sync
        vis = sync_segments(frames)[None].to(self.device)
        s = min(mel.shape[1], vis.shape[1])
        k = self.desync_segments
        if s < k:
            raise WavFlowError(f"{s} segments < the {k} the offset head needs (DeSync)")
        a_feats = net.audio_features(mel[:, :s])
        v_feats = net.visual_features(vis[:, :s])
        windows = [(0, k), (s - k, s)]  # the first and the last k segments
        logits = torch.stack([net.offset_logits(v_feats[:, lo:hi], a_feats[:, lo:hi]) for lo, hi in windows], dim=1)
        return float(M.desync_from_logits(logits.cpu(), offset_grid())[0])

    @torch.inference_mode()
    def imagebind_video(self, video: Path) -> Tensor:
        frames = decode_imagebind_frames(video, self.duration)
        return self.nets["imagebind"].video(frames.to(self.device))[0].cpu()

    @torch.inference_mode()
    def clap_text(self, caption: str) -> Tensor:
        return self.nets["clap"].text([caption])[0].cpu()


def extract_all(pairing: Pairing, extractor: Extractor, progress: Callable[[int, int], None] | None = None
                ) -> tuple[dict[str, ClipFeatures], dict[str, list[str]]]:
    """Features for every readable pair; unreadable ids go to `pairing.unreadable`."""
    feats: dict[str, ClipFeatures] = {}
    problems: dict[str, list[str]] = {}
    for i, pair in enumerate(pairing.pairs):
        if progress:
            progress(i, len(pairing.pairs))
        clip = ClipFeatures()
        try:
            clip.gen = extractor.audio_features(pair.generated, reference=False)
        except WavFlowError as exc:
            pairing.unreadable[pair.id] = f"generated: {exc}"
            continue
        try:
            clip.ref = extractor.audio_features(pair.reference, reference=True)
        except WavFlowError as exc:
            pairing.unreadable[pair.id] = f"reference: {exc}"
            continue
        nets = extractor.nets
        if pair.video is not None and "imagebind" in nets:
            try:
                clip.ib = _cos(clip.gen["ib_audio"], extractor.imagebind_video(pair.video))
            except WavFlowError as exc:
                problems.setdefault(pair.id, []).append(f"IB_score: {exc}")
        if pair.video is not None and "synchformer" in nets:
            try:
                clip.desync = extractor.desync(clip.gen["sync_wave"], pair.video)
            except WavFlowError as exc:
                problems.setdefault(pair.id, []).append(f"DeSync: {exc}")
        clip.gen.pop("sync_wave", None)
        if pair.caption and "clap" in nets:
            clip.clap = _cos(clip.gen["clap_audio"], extractor.clap_text(pair.caption))
        feats[pair.id] = clip
    return feats, problems


def _entry(value: float, n: int, **extra: Any) -> dict[str, Any]:
    return {"value": float(value), "n": int(n), **extra}


def group_metrics(ids: list[str], feats: Mapping[str, ClipFeatures], wanted: list[str], *, is_splits: int,
                  is_seed: int) -> tuple[dict[str, Any], dict[str, str]]:
    """The metrics over the clips `ids`; a metric that cannot be formed here gets a reason."""
    out: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    clips = [feats[i] for i in ids if i in feats]

    def stack(side: str, key: str) -> Tensor | None:
        rows = [getattr(c, side).get(key) for c in clips]
        return torch.stack(rows) if rows and all(r is not None for r in rows) else None

    for name in wanted:
        net = METRIC_NETWORK[name]
        key = net  # feature names start with the network key: passt_emb, panns_logits, ...
        try:
            if name.startswith("FD_"):
                if net == "vggish":
                    gen = [c.gen["vggish"] for c in clips if "vggish" in c.gen]
                    ref = [c.ref["vggish"] for c in clips if "vggish" in c.ref]
                    if len(gen) < 2:
                        raise ValueError(f"{len(gen)} clip(s): FD needs at least 2")
                    g, r = torch.cat(gen), torch.cat(ref)
                    out[name] = _entry(M.frechet_distance(g.numpy(), r.numpy()), len(gen), frames=[len(g), len(r)])
                else:
                    g, r = stack("gen", f"{key}_emb"), stack("ref", f"{key}_emb")
                    if g is None or r is None or len(g) < 2:
                        raise ValueError(f"{len(clips)} clip(s): FD needs at least 2")
                    out[name] = _entry(M.frechet_distance(g.numpy(), r.numpy()), len(g))
            elif name.startswith("KL_"):
                g, r = stack("gen", f"{key}_logits"), stack("ref", f"{key}_logits")
                if g is None or r is None:
                    raise ValueError("no clips")
                kl = M.kl_divergence(g, r)
                out[name] = _entry(kl["softmax"], len(g), sigmoid=kl["sigmoid"])
            elif name.startswith("IS_"):
                g = stack("gen", f"{key}_logits")
                if g is None:
                    raise ValueError("no clips")
                splits = min(is_splits, len(g))
                score = M.inception_score(g, splits=splits, seed=is_seed)
                out[name] = _entry(score["mean"], len(g), std=score["std"], splits=splits)
            elif name == "IB_score":
                vals = [c.ib for c in clips if c.ib is not None]
                if not vals:
                    raise ValueError("no clip with a readable video")
                out[name] = _entry(float(np.mean(vals)), len(vals))
            elif name == "DeSync":
                vals = [c.desync for c in clips if c.desync is not None]
                if not vals:
                    raise ValueError("no clip with a readable video of the full duration")
                out[name] = _entry(float(np.mean(vals)), len(vals))
            elif name == "CLAP_score":
                vals = [c.clap for c in clips if c.clap is not None]
                if not vals:
                    raise ValueError("no clip with a caption")
                out[name] = _entry(float(np.mean(vals)), len(vals))
        except ValueError as exc:
            skipped[name] = str(exc)
    return out, skipped


def compute_report(pairing: Pairing, feats: Mapping[str, ClipFeatures], wanted: list[str], *, is_splits: int,
                   is_seed: int) -> dict[str, Any]:
    groups: dict[str, list[str]] = {"overall": [p.id for p in pairing.pairs if p.id in feats]}
    for mode in (*MODES, "unconditional"):
        ids = [p.id for p in pairing.pairs if p.mode == mode and p.id in feats]
        if ids:
            groups[mode] = ids
    report: dict[str, Any] = {}
    for name, ids in groups.items():
        values, skipped = group_metrics(ids, feats, wanted, is_splits=is_splits, is_seed=is_seed)
        report[name] = {"clips": len(ids), "metrics": values, "skipped": skipped}
    return report


def format_table(groups: Mapping[str, Any], metrics: list[str]) -> str:
    names = list(groups)
    header = ["metric"] + [f"{g} ({groups[g]['clips']} clips)" for g in names]
    rows = [header]
    for m in metrics:
        row = [f"{m} ({BETTER[m]} better)"]
        for g in names:
            e = groups[g]["metrics"].get(m)
            row.append("-" if e is None else f"{e['value']:.4g} (n={e['n']})")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def to_json(obj: Any) -> str:
    def clean(x: Any) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {str(k): clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        if isinstance(x, Path):
            return str(x)
        return x

    return json.dumps(clean(obj), indent=2, sort_keys=False) + "\n"
