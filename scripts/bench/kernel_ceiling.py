#!/usr/bin/env python
"""How fast can the trainer's step be with the kernels it calls? A ceiling, measured.

Records every FLOP-carrying operator (matmuls, convolutions and their backward, attention
forward and backward) that one real trainer step (`Trainer.step.update`, as in
bench_model.py's train_step phase) dispatches, with its shapes, strides, dtypes and arguments;
then replays each distinct call alone on fresh tensors of the same layout and times it.

- `kernel_seconds`: the step's FLOP-carrying kernels, each at its isolated speed, summed. A
  step that spent no time at all on anything else (casts, norms, elementwise work, optimizer,
  EMA, Python) would take this long.
- `ceiling_fraction_of_dense_matmul`: step FLOPs / kernel_seconds / the dense matmul rate of
  --dtype measured in the same run: the most any glue-level change (fusion, compile, fewer
  casts) can reach without faster kernels for these shapes.
- `max_speedup_without_glue`: the real step's seconds / kernel_seconds.
- `groups`: the same per operator family, and `top_calls` the slowest distinct calls.

    python scripts/bench/kernel_ceiling.py --preset small_16k --batch 16 --duration 1 --dtype bf16 \\
        --threads 2 [--options conv_impl=matmul,attention_backend=math] [--out ceiling.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import torch
import torch.utils.flop_counter as flop_counter
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a plain clone too

import bench_model  # noqa: E402
from wavflow.io_utils import atomic_write_text  # noqa: E402
from wavflow.model import PRESETS  # noqa: E402
from wavflow.speed import SpeedOptions  # noqa: E402
from wavflow.train.dataset import collate_train  # noqa: E402
from wavflow.train.trainer import Trainer  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Operators that carry FLOPs: torch's registry plus the CPU attention kernels bench_model adds.
FLOP_OPS = {*flop_counter.flop_registry, *bench_model.EXTRA_FLOP_FORMULAS}
_GROUPS = {"addmm": "mm", "bmm": "mm", "baddbmm": "mm", "_convolution": "convolution",
           "_scaled_dot_product_flash_attention_for_cpu": "attention",
           "_scaled_dot_product_flash_attention_for_cpu_backward": "attention_backward"}


class TensorSpec:
    """Layout of a recorded tensor: enough to make a fresh one of the same shape and strides."""

    def __init__(self, t: torch.Tensor) -> None:
        self.shape, self.stride, self.dtype = tuple(t.shape), tuple(t.stride()), t.dtype
        self.device = t.device

    def __repr__(self) -> str:
        return f"T{self.shape}{self.stride}{str(self.dtype).removeprefix('torch.')}"

    def make(self, gen: torch.Generator) -> torch.Tensor:
        extent = 1 + sum((s - 1) * st for s, st in zip(self.shape, self.stride)) if all(self.shape) else 0
        if self.dtype.is_floating_point:
            base = torch.randn(extent, generator=gen, dtype=torch.float32).mul_(0.5).to(self.dtype)
        else:
            base = torch.zeros(extent, dtype=self.dtype)
        return base.to(self.device).as_strided(self.shape, self.stride)


class Call:
    """One distinct operator call (same op, layouts and arguments) and how often the step made it."""

    def __init__(self, func: Any, args: tuple, kwargs: dict) -> None:
        spec = lambda x: TensorSpec(x) if isinstance(x, torch.Tensor) else x  # noqa: E731
        self.func, self.args, self.kwargs = func, tree_map(spec, args), tree_map(spec, kwargs)
        self.count, self.flops, self.seconds = 1, 0, 0.0
        self.key = f"{func}{self.args!r}{self.kwargs!r}"

    @property
    def group(self) -> str:
        name = self.func._overloadpacket.__name__
        return _GROUPS.get(name, name)

    def runner(self, seed: int = 0) -> Callable[[], Any]:
        gen = torch.Generator().manual_seed(seed)
        make = lambda x: x.make(gen) if isinstance(x, TensorSpec) else x  # noqa: E731
        args, kwargs = tree_map(make, self.args), tree_map(make, self.kwargs)
        return lambda: self.func(*args, **kwargs)


class RecordFlopOps(TorchDispatchMode):
    """Runs every op as usual and records the ones that carry FLOPs, merged by signature."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, Call] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if func._overloadpacket in FLOP_OPS:
            call = Call(func, args, kwargs)
            if call.key in self.calls:
                self.calls[call.key].count += 1
            else:
                self.calls[call.key] = call
        return func(*args, **kwargs)


def time_call(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    return statistics.median(bench_model.timed(fn, device) for _ in range(repeats))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small_16k", choices=sorted(PRESETS))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--duration", type=float, default=1.0)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16")
    p.add_argument("--options", default="", help="speed options of the step (k=v,...; default: all reference)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=10, help="timed calls per distinct kernel call and of the step")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--top", type=int, default=12, help="slowest distinct calls to list")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if min(args.batch, args.repeats) < 1 or args.warmup < 0:
        p.error("--batch and --repeats must be >= 1, --warmup >= 0")
    args.speed = bench_model.parse_options(args.options) if args.options else SpeedOptions.reference()
    # what bench_model.train_config reads
    args.workers = 0
    return args


def measure(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    mm = bench_model.dense_matmul_flops_per_s(device, DTYPES[args.dtype])
    with tempfile.TemporaryDirectory(prefix="wavflow_ceiling_") as tmp:
        root = Path(tmp)
        shapes = bench_model.condition_shapes(args.preset, args.duration)
        csv = bench_model.write_dataset(root / "data", max(2 * args.batch, 16), 16000, args.duration, shapes)
        tr = Trainer(bench_model.train_config(args, csv, root / "out", device, args.speed, "ceiling"))
        bench_model.perturb(tr.model, 1)
        batch = collate_train([tr.dataset[i] for i in range(args.batch)])
        step = lambda: tr.step.update([batch], lr_epoch=0.0)  # noqa: E731
        step_seconds = time_call(step, device, args.warmup, args.repeats)
        recorder = RecordFlopOps()
        with recorder:
            step()
        counted = bench_model.count_flops(step)  # the whole step as bench_model counts it
    calls = list(recorder.calls.values())
    for c in calls:
        run = c.runner()
        c.flops = bench_model.count_flops(run)
        c.seconds = time_call(run, device, args.warmup, args.repeats)
    calls = [c for c in calls if c.flops]  # e.g. a convolution_backward asked for the bias only
    mm = max(mm, bench_model.dense_matmul_flops_per_s(device, DTYPES[args.dtype]))
    result = summarise(args, calls, step_seconds, mm)
    result["step_flops_counted"] = counted
    return result


def summarise(args: argparse.Namespace, calls: list[Call], step_seconds: float, mm: float) -> dict[str, Any]:
    flops = sum(c.flops * c.count for c in calls)
    kernel = sum(c.seconds * c.count for c in calls)
    groups: dict[str, dict[str, float]] = defaultdict(lambda: {"calls": 0, "flops": 0, "seconds": 0.0})
    for c in calls:
        g = groups[c.group]
        g["calls"] += c.count
        g["flops"] += c.flops * c.count
        g["seconds"] += c.seconds * c.count
    for g in groups.values():
        g["fraction_of_dense_matmul"] = g["flops"] / g["seconds"] / mm
        g["share_of_kernel_seconds"] = g["seconds"] / kernel
        g["share_of_step_seconds"] = g["seconds"] / step_seconds
    top = sorted(calls, key=lambda c: c.seconds * c.count, reverse=True)[: args.top]
    return {
        "preset": args.preset, "batch": args.batch, "duration_s": args.duration, "dtype": args.dtype,
        "device": args.device, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "options": args.speed.__dict__, "dense_matmul_flops_per_s": mm,
        "step_seconds": step_seconds, "step_flops": flops, "kernel_seconds": kernel,
        "achieved_fraction_of_dense_matmul": flops / step_seconds / mm,
        "ceiling_fraction_of_dense_matmul": flops / kernel / mm,
        "max_speedup_without_glue": step_seconds / kernel,
        "distinct_calls": len(calls),
        "groups": dict(sorted(groups.items(), key=lambda kv: -kv[1]["seconds"])),
        "top_calls": [{"op": str(c.func), "count": c.count, "flops": c.flops, "seconds": c.seconds,
                       "fraction_of_dense_matmul": c.flops / c.seconds / mm, "args": repr(c.args)[:300]}
                      for c in top],
    }


def format_report(r: dict[str, Any]) -> str:
    lines = [
        f"{r['preset']} batch {r['batch']} x {r['duration_s']} s, {r['dtype']}, {r['threads']} threads; "
        f"dense matmul {r['dense_matmul_flops_per_s'] / 1e9:.0f} GFLOP/s",
        f"step {r['step_seconds']:.4f} s ({100 * r['achieved_fraction_of_dense_matmul']:.1f} % of dense matmul); "
        f"its FLOP kernels alone {r['kernel_seconds']:.4f} s -> ceiling {100 * r['ceiling_fraction_of_dense_matmul']:.1f} %, "
        f"at most {r['max_speedup_without_glue']:.2f}x from removing everything else",
        f"{'group':<22} {'calls':>5} {'GFLOP':>8} {'s':>8} {'of mm':>6} {'of step':>8}",
    ]
    for name, g in r["groups"].items():
        lines.append(f"{name:<22} {g['calls']:>5} {g['flops'] / 1e9:>8.2f} {g['seconds']:>8.4f} "
                     f"{100 * g['fraction_of_dense_matmul']:>5.1f}% {100 * g['share_of_step_seconds']:>7.1f}%")
    lines.append("slowest distinct calls (count x seconds):")
    for c in r["top_calls"]:
        lines.append(f"  {c['count']:>3} x {c['seconds'] * 1e3:7.2f} ms {100 * c['fraction_of_dense_matmul']:5.1f}%  {c['op']}  {c['args'][:120]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight")
    result = measure(args)
    print(format_report(result))
    if args.out is not None:
        atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
