#!/usr/bin/env python
"""What the spectral skip costs a training step: forward + backward of a CPU-sized network without
the skip, with the per-token DCT form of its first build and with the lapped form, interleaved in
one process (docs/method.md §2.14; docs/benchmarks.md, "Model speed").

    python scripts/bench/spectral_skip_cost.py [--preset tiny_16k] [--batch 16] [--duration 1.0] [--repeats 7]

Prints the median seconds of each variant and its ratio to the network without the skip.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from wavflow.model import build_model  # noqa: E402

VARIANTS = {"none": None, "dct": False, "lapped": True}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny_16k")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--duration", type=float, default=1.0, help="seconds of 16 kHz audio per row")
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args()
    n = int(round(a.duration * 16000)) // 200
    shapes = dict(clip_seq_len=max(1, int(8 * a.duration)), sync_seq_len=max(8, int(16 * a.duration)),
                  text_seq_len=77, clip_dim=1024, sync_dim=768, text_dim=1024)
    models = {}
    for name, lapped in VARIANTS.items():
        torch.manual_seed(0)
        model = build_model(a.preset, latent_seq_len=n, **shapes)
        if lapped is not None:
            model.attach_spectral_skip(lapped=lapped)
        models[name] = model.train()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(a.batch, n, 200, generator=g)
    conds = (torch.randn(a.batch, shapes["clip_seq_len"], 1024, generator=g),
             torch.randn(a.batch, shapes["sync_seq_len"], 768, generator=g),
             torch.randn(a.batch, 77, 1024, generator=g))
    t = torch.rand(a.batch, generator=g)

    def step(model: torch.nn.Module) -> float:
        start = time.perf_counter()
        model.zero_grad(set_to_none=True)
        model(x, *conds, t).pow(2).mean().backward()
        return time.perf_counter() - start

    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(2):  # warm-up
        for model in models.values():
            step(model)
    for _ in range(a.repeats):
        for name, model in models.items():
            times[name].append(step(model))
    base = statistics.median(times["none"])
    print(f"{a.preset}, batch {a.batch}, N = {n}, {torch.get_num_threads()} threads: forward + backward")
    for name, ts in times.items():
        print(f"  {name:7s} {statistics.median(ts):.4f} s  x{statistics.median(ts) / base:.3f}")


if __name__ == "__main__":
    main()
