#!/usr/bin/env python
"""Benchmark the WavFlow network: forward, train step, sampling speed, memory, FLOP/s.

    python scripts/bench/bench_model.py --preset tiny_16k --batch 2 --duration 2 [--dtype bf16]
        [--steps 25] [--cfg 4.5] [--device auto|cpu|cuda] [--out bench.json]

Reports, per phase, the median wall time over --repeats runs (after --warmup runs):
- forward: one network call (eval, inference mode);
- train step: zero_grad + forward + x-prediction loss + backward + AdamW step;
- sampling: `--steps` Euler steps with batched CFG (the model sees 2B rows per step) plus
  condition preprocessing, as seconds of audio generated per wall second (real-time factor);
plus peak memory (CUDA max_memory_allocated, or the process's peak RSS on CPU), model FLOPs
counted by torch.utils.flop_counter.FlopCounterMode, the achieved FLOP/s, and a dense-matmul
FLOP/s measured in the same run as the machine's yardstick. bf16 runs the float32 model under
autocast, as training and inference do.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a plain clone too

from wavflow.io_utils import atomic_write_text  # noqa: E402
from wavflow.model import PRESETS, build_model  # noqa: E402
from wavflow.model.flow import cfg_denoiser, euler_sample  # noqa: E402
from wavflow.shapes import latent_seq_len, video_seq_lens  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", required=True, choices=sorted(PRESETS))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--duration", type=float, default=8.0, help="seconds of audio per sample")
    p.add_argument("--sample-rate", type=int, default=None, help="default: 44100 for *_44k presets, else 16000")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--steps", type=int, default=25, help="Euler steps for the sampling benchmark")
    p.add_argument("--cfg", type=float, default=4.5)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--skip-sampling", action="store_true")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.batch < 1 or args.duration <= 0 or args.steps < 1 or args.repeats < 1 or args.warmup < 0:
        p.error("--batch, --steps, --repeats must be >= 1, --duration > 0, --warmup >= 0")
    if not PRESETS[args.preset].pinned() and video_seq_lens(args.duration)[1] == 0:
        p.error(f"--duration {args.duration} s holds no 16-frame Synchformer segment (need >= 0.64 s)")
    return args


# ------------------------------------------------------------------------------ helpers
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int) -> float:
    """Median wall seconds of fn() over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def count_flops(fn: Callable[[], Any]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


class PeakMemory:
    """Peak bytes during a phase: CUDA allocator peak, or process peak RSS on CPU (monotonic)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:  # ru_maxrss is KiB on Linux, bytes on macOS
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.peak = rss if platform.system() == "Darwin" else rss * 1024


def dense_matmul_flops_per_s(device: torch.device, dtype: torch.dtype, repeats: int) -> float:
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    inner = 10 if device.type == "cuda" else 3

    def run() -> None:
        for _ in range(inner):
            torch.mm(a, b)

    seconds = time_call(run, device, repeats, warmup=1)
    return 2 * n**3 * inner / seconds


def autocast(device: torch.device, dtype: str):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")


# --------------------------------------------------------------------------------- run
def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    preset = PRESETS[args.preset]
    sr = args.sample_rate or (44100 if args.preset.endswith("44k") else 16000)
    n = latent_seq_len(sr, args.duration, preset.latent_dim)
    clip_len, sync_len = video_seq_lens(args.duration)
    shapes = dict(clip_seq_len=clip_len, sync_seq_len=sync_len, text_seq_len=77,
                  clip_dim=1024, sync_dim=768, text_dim=1024)
    shapes.update(preset.pinned())  # reference presets keep their fixed condition lengths
    torch.manual_seed(0)
    model = build_model(args.preset, latent_seq_len=n, gradient_checkpointing=args.gradient_checkpointing,
                        **shapes).to(device)
    # A fresh model outputs 0 with zeroed gates; perturb so every path does real work.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)

    bs = args.batch
    x = torch.randn(bs, n, preset.latent_dim, device=device)
    clip = torch.randn(bs, model.clip_seq_len, model.clip_dim, device=device)
    sync = torch.randn(bs, model.sync_seq_len, model.sync_dim, device=device)
    text = torch.randn(bs, model.text_seq_len, model.text_dim, device=device)
    t = torch.rand(bs, device=device)
    x1 = torch.randn_like(x)
    results: dict[str, Any] = {
        "preset": args.preset, "params": sum(p.numel() for p in model.parameters()),
        "batch": bs, "duration_s": args.duration, "sample_rate": sr, "latent_seq_len": n,
        "clip_seq_len": model.clip_seq_len, "sync_seq_len": model.sync_seq_len,
        "dtype": args.dtype, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "gradient_checkpointing": args.gradient_checkpointing, "phases": {},
    }

    def forward() -> None:
        with torch.inference_mode(), autocast(device, args.dtype):
            model(x, clip, sync, text, t)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, betas=(0.9, 0.95))

    def train_loss() -> torch.Tensor:
        with autocast(device, args.dtype):
            pred = model(x, clip, sync, text, t)
        return (pred.float() - x1).square().mean()

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        train_loss().backward()
        optimizer.step()

    def fwd_bwd() -> None:  # FLOPs of a train step (the optimizer's elementwise work is not counted)
        train_loss().backward()
        optimizer.zero_grad(set_to_none=True)

    phases: list[tuple[str, Callable[[], None], Callable[[], int], float]] = []
    phases.append(("forward", forward, lambda: count_flops(forward), bs * args.duration))
    phases.append(("train_step", train_step, lambda: count_flops(fwd_bwd), bs * args.duration))
    if not args.skip_sampling:
        def conditions() -> tuple[Any, Any]:
            return model.preprocess_conditions(clip, sync, text), model.get_empty_conditions(bs)

        def sample() -> None:
            with torch.inference_mode(), autocast(device, args.dtype):
                cond, empty = conditions()
                fn = cfg_denoiser(model, cond, empty, args.cfg, batched=True)
                x0 = torch.randn(bs, n, preset.latent_dim, device=device)
                euler_sample(fn, x0, num_steps=args.steps)

        def sample_flops() -> int:
            # Counted in two parts: FlopCounterMode's module hooks cannot handle no-grad views
            # of parameters (the empty sequences), so conditions are counted with grad on.
            with autocast(device, args.dtype):
                flops = count_flops(conditions)
                with torch.no_grad():
                    cond, empty = conditions()
                    fn = cfg_denoiser(model, cond, empty, args.cfg, batched=True)
                    t0 = torch.tensor(0.5)
                    flops += args.steps * count_flops(lambda: fn(t0, x))
            return flops

        phases.append(("sampling", sample, sample_flops, bs * args.duration))

    for name, fn, flop_fn, audio_seconds in phases:
        model.train(name == "train_step")
        with PeakMemory(device) as mem:
            seconds = time_call(fn, device, args.repeats, args.warmup)
        flops = flop_fn()
        results["phases"][name] = {
            "seconds": seconds,
            "flops": flops,
            "achieved_flops_per_s": flops / seconds,
            "peak_memory_bytes": mem.peak,
            "audio_seconds_per_wall_second": audio_seconds / seconds,
        }
    model.eval()
    if not args.skip_sampling:
        results["phases"]["sampling"].update(steps=args.steps, cfg=args.cfg, real_time_factor=bs * args.duration
                                             / results["phases"]["sampling"]["seconds"])
    mm_dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    results["dense_matmul_flops_per_s"] = dense_matmul_flops_per_s(device, mm_dtype, args.repeats)
    for phase in results["phases"].values():
        phase["fraction_of_dense_matmul"] = phase["achieved_flops_per_s"] / results["dense_matmul_flops_per_s"]
    return results


def format_table(results: dict[str, Any]) -> str:
    head = (f"{results['preset']} ({results['params'] / 1e6:.2f} M params)  batch {results['batch']} x "
            f"{results['duration_s']} s @ {results['sample_rate']} Hz (N={results['latent_seq_len']})  "
            f"{results['dtype']} on {results['device']} ({results['threads']} threads)")
    rows = [f"{'phase':<11} {'seconds':>9} {'GFLOP':>10} {'GFLOP/s':>9} {'of mm':>6} {'peak MiB':>9} {'audio s/s':>10}"]
    for name, p in results["phases"].items():
        rows.append(
            f"{name:<11} {p['seconds']:>9.4f} {p['flops'] / 1e9:>10.2f} {p['achieved_flops_per_s'] / 1e9:>9.1f} "
            f"{100 * p['fraction_of_dense_matmul']:>5.1f}% {p['peak_memory_bytes'] / 2**20:>9.1f} "
            f"{p['audio_seconds_per_wall_second']:>10.2f}"
        )
    foot = f"dense matmul: {results['dense_matmul_flops_per_s'] / 1e9:.1f} GFLOP/s"
    if "sampling" in results["phases"]:
        s = results["phases"]["sampling"]
        foot += f"; sampling {s['steps']} Euler steps, cfg {s['cfg']}: real-time factor {s['real_time_factor']:.2f}"
    return "\n".join([head, *rows, foot])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    # bf16 activations meet the float32 RMSNorm weights under autocast (as in training); torch
    # warns that it cannot use its fused kernel, which is expected here.
    warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight")
    results = run_benchmark(args)
    print(format_table(results))
    if args.out is not None:
        atomic_write_text(args.out, json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
