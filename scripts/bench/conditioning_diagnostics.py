"""How much does each condition steer a trained model? Measurements behind docs/benchmarks.md
("Every mode on its own").

    python scripts/bench/conditioning_diagnostics.py --checkpoint RUN_DIR_OR_PTH --data DATA_DIR \
        --features-csv FEAT.csv [FEAT.csv ...] [--live] [--json OUT.json]

DATA_DIR is a built-in data set (wavflow.demo.make_dataset: its metadata.csv gives each clip's
class and mode); the feature CSVs are the training CSVs of the run (extraction output). Printed:

1. Text features: nearest-class-centroid accuracy of the time-pooled caption features, raw and
   as the network sees them (after `cond_norm`, `text_input_proj` and `text_cond_proj`: the
   pooled text condition `text_c`), leave-one-out over the training captions and train ->
   held-out captions; and where the learned empty text condition sits between the classes.
2. Scale of the global condition's parts: RMS of the timestep embedding, `clip_c` and `text_c`
   (the adaLN input is their sum), and the RMS of text_c's class-centroid spread.
3. Per mode, the flow-matching loss of the training rows at fixed flow times and noise, with
   their own conditions, with the caption replaced by the empty text, with the video replaced by
   the empty tokens, and with the caption of another class: how much of the loss each condition
   explains is how much the model uses it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from wavflow.audio import load_audio_tokens  # noqa: E402
from wavflow.generator import WavFlowGenerator  # noqa: E402
from wavflow.io_utils import atomic_write_text, safe_torch_load  # noqa: E402
from wavflow.model.flow import flow_loss, interpolate  # noqa: E402

TIMES = (0.05, 0.2, 0.4, 0.6, 0.8)


def centroid_accuracy(train: np.ndarray, train_y: list[str], test: np.ndarray | None = None,
                      test_y: list[str] | None = None) -> float:
    """Nearest class centroid (cosine, centred on the training mean); leave-one-out when no test."""
    mu = train.mean(0, keepdims=True)
    a = train - mu
    classes = sorted(set(train_y))
    y = np.array(train_y)
    if test is None:
        hits = 0
        for i in range(len(a)):
            keep = np.arange(len(a)) != i
            cents = np.stack([a[keep & (y == c)].mean(0) for c in classes])
            hits += classes[int(np.argmax(_cos(a[i:i + 1], cents)))] == y[i]
        return hits / len(a)
    cents = np.stack([a[y == c].mean(0) for c in classes])
    pred = [classes[int(k)] for k in np.argmax(_cos(test - mu, cents), axis=1)]
    return float(np.mean([p == t for p, t in zip(pred, test_y)]))


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / (np.linalg.norm(a, axis=1, keepdims=True) + 1e-12)
    b = b / (np.linalg.norm(b, axis=1, keepdims=True) + 1e-12)
    return a @ b.T


def load_rows(csvs: list[Path], meta: pd.DataFrame) -> list[dict]:
    by_id = meta.set_index("id")
    rows = []
    for path in csvs:
        for r in pd.read_csv(path).to_dict("records"):
            feats = safe_torch_load(Path(r["features_path"]), what="feature file")
            rows.append({"id": r["id"], "audio_path": r["audio_path"], "label": by_id.loc[r["id"], "label"],
                         "mode": by_id.loc[r["id"], "mode"], "video": bool(r.get("video_exist", 1)),
                         "text": bool(r.get("text_exist", 1)), "feats": feats})
    return rows


@torch.no_grad()
def text_report(gen: WavFlowGenerator, rows: list[dict], meta: pd.DataFrame) -> dict:
    m = gen.model
    cap = [r for r in rows if r["text"]]
    raw = np.stack([r["feats"]["text_features"].float().mean(0).numpy() for r in cap])
    y = [r["label"] for r in cap]
    text_c = _text_c(m, torch.stack([r["feats"]["text_features"].float() for r in cap]))
    held = meta[(meta.split == "holdout") & (meta.caption.fillna("") != "")]
    held_feats = torch.stack([gen.encode_text(c).float().cpu() for c in held.caption])
    held_c = _text_c(m, held_feats)
    empty_c = _text_c(m, m.empty_string_sequence(1).float())
    classes = sorted(set(y))
    yy = np.array(y)
    cents = np.stack([text_c[yy == c].mean(0) for c in classes])
    spread = float(np.sqrt(((cents - cents.mean(0)) ** 2).sum(1).mean()))
    empty_to_centre = float(np.linalg.norm(empty_c[0] - cents.mean(0)))
    return {
        "captions_train": len(cap), "captions_holdout": len(held),
        "raw_pooled_loo_acc": centroid_accuracy(raw, y),
        "raw_pooled_holdout_acc": centroid_accuracy(raw, y, held_feats.mean(1).numpy(), list(held.label)),
        "text_c_loo_acc": centroid_accuracy(text_c, y),
        "text_c_holdout_acc": centroid_accuracy(text_c, y, held_c, list(held.label)),
        "text_c_rms": float(np.sqrt((text_c ** 2).mean())),
        "text_c_class_spread_rms": spread / np.sqrt(text_c.shape[1]),
        "empty_text_c_to_class_centre_rms": empty_to_centre / np.sqrt(text_c.shape[1]),
        "chance": 1.0 / len(classes),
    }


def _text_c(m: torch.nn.Module, text: torch.Tensor) -> np.ndarray:
    b = text.shape[0]
    cond = m.preprocess_conditions(m.empty_clip_sequence(b), m.empty_sync_sequence(b), text)
    return cond.text_c.float().numpy()


@torch.no_grad()
def scale_report(gen: WavFlowGenerator, rows: list[dict]) -> dict:
    m = gen.model
    vid = [r for r in rows if r["video"]][:64]
    clip = torch.stack([r["feats"]["clip_features"].float() for r in vid])
    sync = torch.stack([r["feats"]["sync_features"].float() for r in vid])
    text = m.empty_string_sequence(len(vid)).float()
    cond = m.preprocess_conditions(clip, sync, text)
    t = torch.tensor(TIMES)
    rms = lambda x: float(x.float().pow(2).mean().sqrt())  # noqa: E731
    return {"t_embed_rms": rms(m.t_embed(t)), "clip_c_rms": rms(cond.clip_c),
            "clip_c_spread_rms": rms(cond.clip_c - cond.clip_c.mean(0)),
            "sync_f_rms": rms(cond.sync_f), "text_c_empty_rms": rms(cond.text_c[:1])}


@torch.no_grad()
def loss_report(gen: WavFlowGenerator, rows: list[dict], data_root: Path, seed: int = 0) -> dict:
    m, cfg = gen.model, gen.cfg
    g = torch.Generator().manual_seed(seed)
    other = {}
    for r in rows:
        if r["text"]:
            other.setdefault(r["label"], r["feats"]["text_features"])
    out: dict[str, dict[str, list[list[float]]]] = {}
    for r in rows:
        x1 = _tokens(gen, data_root / r["audio_path"] if not Path(r["audio_path"]).is_absolute() else Path(r["audio_path"]))
        f = r["feats"]
        b = 1
        clip = f["clip_features"].float()[None] if r["video"] else m.empty_clip_sequence(b)
        sync = f["sync_features"].float()[None] if r["video"] else m.empty_sync_sequence(b)
        text = f["text_features"].float()[None] if r["text"] else m.empty_string_sequence(b)
        variants = {"own": (clip, sync, text)}
        if r["text"]:
            variants["no_text"] = (clip, sync, m.empty_string_sequence(b))
            wrong = next(v for k, v in other.items() if k != r["label"])
            variants["wrong_text"] = (clip, sync, wrong.float()[None])
        if r["video"]:
            variants["no_video"] = (m.empty_clip_sequence(b), m.empty_sync_sequence(b), text)
        losses = {k: [] for k in variants}
        for t in TIMES:
            x0 = torch.randn(x1.shape, generator=g)
            ts = torch.full((1,), t)
            xt = interpolate(x0, x1, ts, float(cfg.sampling.min_sigma))
            for k, (c, s, tx) in variants.items():
                pred = m(xt, c, s, tx, ts)
                losses[k].append(float(flow_loss(pred, x0, x1, xt, ts, prediction_type="x", loss_type="x")))
        mode = out.setdefault(r["mode"], {})
        for k, v in losses.items():
            mode.setdefault(k, []).append(v)
    return {mode: {k: {"n": len(v), "x_mse": float(np.mean(v)),
                       "x_mse_per_t": dict(zip(map(str, TIMES), np.mean(v, axis=0).round(4).tolist()))}
                   for k, v in d.items()} for mode, d in out.items()}


def _tokens(gen: WavFlowGenerator, path: Path) -> torch.Tensor:
    d = gen.cfg.data
    return load_audio_tokens(path, int(d.target_sample_rate), float(d.audio_duration),
                             audio_dim=int(d.audio_dim), audio_scale=float(d.audio_scale)).float()[None]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, type=Path)
    ap.add_argument("--data", required=True, type=Path, help="built-in data set folder (metadata.csv)")
    ap.add_argument("--features-csv", required=True, nargs="+", type=Path)
    ap.add_argument("--live", action="store_true", help="live weights instead of the EMA")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    gen = WavFlowGenerator.from_checkpoint(args.checkpoint, use_ema=not args.live, device="cpu")
    gen.model.eval()
    meta = pd.read_csv(args.data / "metadata.csv", keep_default_na=False)
    rows = load_rows(args.features_csv, meta)
    report = {"text": text_report(gen, rows, meta), "scale": scale_report(gen, rows),
              "loss": loss_report(gen, rows, args.data)}
    print(json.dumps(report, indent=1))
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
