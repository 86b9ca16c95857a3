"""When does a sample commit to its sound class? A probe for checkpoints trained on the built-in set.

    python scripts/bench/class_commitment.py --checkpoint RUN_DIR_OR_PTH --data DATA_DIR \
        [--rows 48] [--cfg 3.0] [--steps 25] [--live] [--json OUT.json] [--wav-dir DIR]

It samples the held-out rows of a built-in (procedural) data set (`holdout_infer.csv` of
DATA_DIR, the same rows, seeds and guidance as the predict job) with Euler steps and, at every
step, classifies the network's clean-audio prediction x̂(t) with the demo's class-accuracy
classifier (wavflow/demo/metrics.py). Per t it prints the share of rows whose x̂(t) already has
the class of the finished sample, and the share that has the right class. A model whose rows
commit in the first few steps (small t, mostly noise) needs training times there: the
learning benchmark found this for its data (docs/benchmarks.md, "Findings behind the recipe").
Needs `prediction_type: x` (the network's output is x̂) as every preset here uses.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from wavflow.audio import unpatchify  # noqa: E402
from wavflow.demo import metrics  # noqa: E402
from wavflow.demo.make_dataset import load_dataset_info  # noqa: E402
from wavflow.generator import WavFlowGenerator, row_seed  # noqa: E402
from wavflow.io_utils import atomic_write_text, check_safe_id  # noqa: E402
from wavflow.model.flow import cfg_denoiser, time_grid, velocity  # noqa: E402


def _rows(data: Path, limit: int) -> list[dict[str, str]]:
    with open(data / "holdout_infer.csv", newline="") as f:
        return list(csv.DictReader(f))[:limit]


def probe(checkpoint: Path, data: Path, *, rows: int, cfg: float, steps: int, use_ema: bool,
          wav_dir: Path | None = None) -> dict:
    gen = WavFlowGenerator.from_checkpoint(checkpoint, use_ema=use_ema, device="cpu")
    if str(gen.cfg.sampling.prediction_type) != "x":
        raise SystemExit(f"{checkpoint}: sampling.prediction_type is {gen.cfg.sampling.prediction_type!r}; "
                         "this probe reads x̂ from the network output and needs 'x'")
    info = load_dataset_info(data)
    ref = metrics.fit_reference(info)
    labels = {c.id: c.label for c in info.clips}
    table = _rows(data, rows)
    unknown = [r["id"] for r in table if r["id"] not in labels]
    if unknown:
        raise SystemExit(f"{data / 'holdout_infer.csv'}: ids not in {data / 'events.json'}: {', '.join(unknown[:5])}")
    items = [gen.encode_row(video=(data / r["video_path"]) if int(r["video_exist"]) else None,
                            text=r["caption"] if int(r["text_exist"]) else None) for r in table]
    seeds = [row_seed(int(gen.cfg.inference.seed), r["id"]) for r in table]
    sr, n = int(gen.cfg.data.target_sample_rate), gen.num_samples

    def waveforms(x_hat: torch.Tensor) -> np.ndarray:
        return unpatchify(x_hat.float() / gen.audio_scale)[:, :n].numpy()

    def classify(x_hat: torch.Tensor) -> list[str]:
        waves = waveforms(x_hat)
        emb = np.stack([metrics.clip_embedding(metrics.log_mel(w, sr)) for w in waves])
        return ref.classifier.predict(emb)

    ts = time_grid(steps)
    per_t: list[tuple[float, list[str]]] = []
    with torch.inference_mode():
        x = gen.initial_noise(seeds)
        cond = gen.model.preprocess_conditions(*gen.stack_conditions(items))
        fn = cfg_denoiser(gen.model, cond, gen.model.get_empty_conditions(len(items)), cfg)
        for i in range(steps):
            t, t_next = ts[i], ts[i + 1]
            x_hat = fn(t, x)
            per_t.append((float(t), classify(x_hat)))
            x = x + (t_next - t) * velocity(x_hat, x, t, "x")
    if wav_dir is not None:  # the finished samples (the last x̂), to compare with a predict run
        wav_dir.mkdir(parents=True, exist_ok=True)
        for r, wave in zip(table, waveforms(x_hat)):
            check_safe_id(r["id"])
            sf.write(wav_dir / f"{r['id']}.wav", wave, sr, subtype="FLOAT")
    final = per_t[-1][1]
    truth = [labels[r["id"]] for r in table]
    out = {"checkpoint": str(checkpoint), "rows": len(table), "cfg": cfg, "steps": steps, "ema": use_ema,
           "per_t": [{"t": round(t, 4),
                      "same_class_as_final": float(np.mean([a == b for a, b in zip(cls, final)])),
                      "right_class": float(np.mean([a == b for a, b in zip(cls, truth)]))}
                     for t, cls in per_t],
           "final": [{"id": r["id"], "label": y, "predicted": c} for r, y, c in zip(table, truth, final)]}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, type=Path, help="run directory or .pth of a full checkpoint")
    p.add_argument("--data", required=True, type=Path, help="built-in data set folder (holdout_infer.csv, events.json)")
    p.add_argument("--rows", type=int, default=48)
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--live", action="store_true", help="live weights instead of EMA-1")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--wav-dir", type=Path, default=None, help="also write each row's finished sample <id>.wav here")
    a = p.parse_args()
    res = probe(a.checkpoint, a.data, rows=a.rows, cfg=a.cfg, steps=a.steps, use_ema=not a.live,
                wav_dir=a.wav_dir)
    print(f"{res['rows']} held-out rows, cfg {res['cfg']}, {res['steps']} Euler steps, "
          f"{'EMA' if res['ema'] else 'live'} weights")
    print("     t   x̂(t) has the final class   x̂(t) has the right class")
    for row in res["per_t"]:
        print(f"{row['t']:6.2f}   {row['same_class_as_final']:26.2f}   {row['right_class']:25.2f}")
    if a.json:
        atomic_write_text(a.json, json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
