"""The Synchformer's tubelet embedding as one GEMM against the Conv3d it equals (same weights,
same input), timed interleaved in one process; prints seconds per call, the ratio and the
largest difference.

    python scripts/bench/tubelet_embed.py [--preset tiny|default] [--segments 8] [--repeats 5] [--threads 2]

Not a test: run it on an idle machine.
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

from wavflow.features.synchformer import PatchEmbed3D, SynchformerConfig  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=("tiny", "default"), default="tiny")
    p.add_argument("--segments", type=int, default=8, help="16-frame segments per call (the encoder's chunk)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = SynchformerConfig.tiny() if args.preset == "tiny" else SynchformerConfig.default()
    embed = PatchEmbed3D(cfg).eval()
    x = torch.randn(args.segments, 3, cfg.num_frames, cfg.image_size, cfg.image_size)
    paths = {"conv3d": lambda: embed.proj(x).flatten(2).transpose(1, 2), "gemm": lambda: embed(x)}
    times: dict[str, list[float]] = {k: [] for k in paths}
    with torch.inference_mode():
        out = {k: f() for k, f in paths.items()}  # warm-up, and the outputs to compare
        for _ in range(args.repeats):
            for k, f in paths.items():
                t0 = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t0)
    conv, gemm = statistics.median(times["conv3d"]), statistics.median(times["gemm"])
    print(f"{args.preset}: {args.segments} segments of {cfg.num_frames}x{cfg.image_size}^2, embed_dim {cfg.embed_dim}, "
          f"{args.threads} thread(s)")
    print(f"conv3d {conv:.3f} s  gemm {gemm:.3f} s  speedup {conv / gemm:.2f}x  "
          f"max |diff| {float((out['conv3d'] - out['gemm']).abs().max()):.2e}")


if __name__ == "__main__":
    main()
