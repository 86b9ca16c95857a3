#!/usr/bin/env python
"""Benchmark WavFlow's real code paths: the trainer's step, the predictor's sampling call, the
data loader, each for today's eager path ("main": every speed option off) and the new path
("fast": the speed options given), interleaved in one process so both see the same machine.

    python scripts/bench/bench_model.py --preset small_16k --batch 16 --duration 1 --dtype bf16 \\
        [--fast optimizer_impl=fused,ema_impl=foreach,conv_impl=matmul,compile=false] \\
        [--phases train_step,forward,sampling,data] [--sample-steps 4 --cfg 4.5 --sample-batch 1] \\
        [--fast-sample-steps 2 --fast-sample-dtype bf16] \\
        [--device auto|cpu|cuda] [--repeats 5] [--profile] [--out bench.json]

Phases (each timed as the median of --repeats calls after --warmup calls, variants interleaved):
- train_step: `Trainer.step.update([batch])`, the function `python -m wavflow.train` runs
  per optimiser step: label drop, noise draw, forward, loss, backward, grad clipping, AdamW,
  both EMA updates. The trainer is built from configs/train.yaml on a synthetic data set
  written to a temporary folder (wav files + feature files + CSV of the requested shapes).
- forward: one network forward under the trainer's autocast, in inference mode.
- sampling: `WavFlowGenerator.generate_batch` (the predict job's call; Euler, batched CFG),
  and "sampling_reference": the reference Euler+CFG loop (two network passes per step, fp32,
  conditions prepared once) on the same weights and noise; their max/mean waveform
  difference is reported. The new path may sample with fewer steps or in bf16
  (--fast-sample-steps / --fast-sample-dtype; main and the reference keep --sample-steps, fp32
  for the reference): whether that keeps the quality is a question for a trained model and the
  demo metrics, not for these random weights (docs/benchmarks.md).
- data: the trainer's own DataLoader (its workers, collate) over the files, read for
  --data-batches batches: `startup_seconds` (to the first batch: what every epoch pays) and
  `samples_per_s` after it (the steady rate; `starves_trainer` compares it with the step).

Per phase: seconds, FLOPs (torch.utils.flop_counter), achieved FLOP/s, the fraction of the
dense matmul rate measured in the same run (`phases.<name>.fraction_of_dense_matmul`, against
the matmul rate of --dtype; `fraction_of_fp32_matmul` too), peak memory (CUDA allocator peak;
on CPU the process RSS peak sampled during the phase), and with --profile the top operators.
With compile=true the first calls (compilation) are timed apart as `compile_seconds` and the
number of recompilations during the timed calls is reported (`recompiles`, should be 0).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import soundfile as sf
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a plain clone too

from wavflow.audio import unpatchify  # noqa: E402
from wavflow.config import load_config  # noqa: E402
from wavflow.io_utils import atomic_write_text  # noqa: E402
from wavflow.model import build_model_from_config, PRESETS  # noqa: E402
from wavflow.shapes import latent_seq_len, video_seq_lens  # noqa: E402
from wavflow.speed import SpeedOptions  # noqa: E402
from wavflow.train.dataset import collate_train  # noqa: E402
from wavflow.train.trainer import Trainer  # noqa: E402

PHASES = ("train_step", "forward", "sampling", "data")
MAIN = "main"
FAST = "fast"
SAMPLE_RATE = 16000  # the synthetic data set's rate; train_config sets data.target_sample_rate to it
DEFAULT_FAST = "optimizer_impl=fused,ema_impl=foreach,conv_impl=matmul,attention_backend=auto,compile=false"


def parse_options(text: str) -> SpeedOptions:
    """'k=v,k=v' -> SpeedOptions (unknown keys and values are errors)."""
    values: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in SpeedOptions.__dataclass_fields__:
            raise SystemExit(f"--fast: {item!r} is not key=value with key in {list(SpeedOptions.__dataclass_fields__)}")
        values[key] = value.lower() == "true" if key == "compile" else value
    return SpeedOptions.from_config(values, "--fast")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small_16k", choices=sorted(PRESETS))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--duration", type=float, default=1.0, help="seconds of audio per sample")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16", help="training precision (autocast)")
    p.add_argument("--fast", default=DEFAULT_FAST, help="speed options of the new path (k=v,...)")
    p.add_argument("--variants", default=f"{MAIN},{FAST}", help="main (all options off), fast, or both")
    p.add_argument("--phases", default=",".join(PHASES))
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers of the data phase")
    p.add_argument("--data-batches", type=int, default=32,
                   help="batches the data phase reads (the first one's time is reported apart as start-up)")
    p.add_argument("--sample-preset", default=None, help="preset of the sampling phase (default: --preset)")
    p.add_argument("--sample-duration", type=float, default=None, help="default: --duration")
    p.add_argument("--sample-batch", type=int, default=1)
    p.add_argument("--sample-steps", type=int, default=4)
    p.add_argument("--sample-dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--fast-sample-steps", type=int, default=None,
                   help="Euler steps of the new path's generate_batch (default: --sample-steps); main and "
                        "the reference loop keep --sample-steps. Fewer steps are a quality trade-off: "
                        "check it on a trained model (docs/benchmarks.md)")
    p.add_argument("--fast-sample-dtype", choices=("fp32", "bf16"), default=None,
                   help="precision of the new path's generate_batch (default: --sample-dtype)")
    p.add_argument("--cfg", type=float, default=4.5)
    p.add_argument("--profile", action="store_true", help="print (and store) the top operators per phase")
    p.add_argument("--write-dataset", type=Path, default=None,
                   help="only write the synthetic training set (and train.csv) here, then exit")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if min(args.batch, args.repeats, args.sample_steps, args.sample_batch) < 1 or args.warmup < 0 or args.data_batches < 2:
        p.error("--batch, --repeats, --sample-steps, --sample-batch must be >= 1, --data-batches >= 2, --warmup >= 0")
    args.variants = [v for v in args.variants.split(",") if v]
    args.phases = [v for v in args.phases.split(",") if v]
    if not set(args.variants) <= {MAIN, FAST} or not args.variants:
        p.error("--variants: main and/or fast")
    if not set(args.phases) <= set(PHASES):
        p.error(f"--phases: a subset of {','.join(PHASES)}")
    args.fast_options = parse_options(args.fast)
    args.sample_preset = args.sample_preset or args.preset
    args.sample_duration = args.sample_duration or args.duration
    if args.fast_sample_steps is None:
        args.fast_sample_steps = args.sample_steps
    args.fast_sample_dtype = args.fast_sample_dtype or args.sample_dtype
    if args.fast_sample_steps < 1:
        p.error("--fast-sample-steps must be >= 1")
    return args


# --------------------------------------------------------------------------- helpers
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def _cpu_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:  # noqa: ANN001
    return sdpa_flop_count(query, key, value)


def _cpu_attention_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:  # noqa: ANN001
    return sdpa_backward_flop_count(grad_out, query, key, value)


# torch's FLOP registry lacks the CPU flash-attention kernels that SDPA runs on CPU: without
# these the attention's FLOPs (forward and backward) would be left out of every CPU figure.
EXTRA_FLOP_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flops,
}


def count_flops(fn: Callable[[], Any]) -> int:
    with FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS) as counter:
        fn()
    return int(counter.get_total_flops())


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak bytes during a block: the CUDA allocator peak, or the process RSS sampled every 2 ms."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            self._stop.wait(0.002)

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif Path("/proc/self/statm").exists():
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif hasattr(self, "_thread"):
            self._stop.set()
            self._thread.join()


def dense_matmul_flops_per_s(device: torch.device, dtype: torch.dtype, repeats: int = 5) -> float:
    """Best-of-`repeats` rate of a square GEMM (n=1024 CPU, 8192 GPU): the machine's yardstick."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    inner = 10 if device.type == "cuda" else 3

    def run() -> None:
        for _ in range(inner):
            torch.mm(a, b)

    run()
    best = min(timed(run, device) for _ in range(repeats))
    return 2 * n**3 * inner / best


def profile_table(fn: Callable[[], Any], device: torch.device, rows: int = 15) -> str:
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60)


def dynamo_graphs() -> int:
    try:
        # lazy: torch._dynamo costs ~1.5 s to import (+70 MiB); --help and --write-dataset
        # (scripts/bench/gpu_check.sh) do not need it
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # dynamo not importable: no compilation happened either
        return 0


# ---------------------------------------------------------------------- data set
def condition_shapes(preset: str, duration: float) -> dict[str, int]:
    clip_len, sync_len = video_seq_lens(duration)
    shapes = dict(clip_seq_len=clip_len, sync_seq_len=sync_len, text_seq_len=77, clip_dim=1024, sync_dim=768, text_dim=1024)
    shapes.update(PRESETS[preset].pinned())
    if shapes["sync_seq_len"] <= 0 or shapes["clip_seq_len"] <= 0:
        raise SystemExit(f"--duration {duration} s holds no 16-frame Synchformer segment (need >= 0.64 s)")
    return shapes


def write_dataset(root: Path, rows: int, sr: int, duration: float, shapes: dict[str, int], seed: int = 0) -> Path:
    """`rows` random wav files + feature files + empty_string.pt + train.csv (all modalities)."""
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    (root / "audio").mkdir(parents=True, exist_ok=True)
    (root / "features").mkdir(parents=True, exist_ok=True)
    lines = ["id,audio_path,features_path,video_exist,text_exist"]
    for i in range(rows):
        wav, pth = root / "audio" / f"r{i}.wav", root / "features" / f"r{i}.pth"
        sf.write(wav, (0.1 * rng.standard_normal(int(sr * duration) + 400)).astype(np.float32), sr)
        torch.save({
            "clip_features": torch.randn(shapes["clip_seq_len"], shapes["clip_dim"], generator=g),
            "sync_features": torch.randn(shapes["sync_seq_len"], shapes["sync_dim"], generator=g),
            "text_features": torch.randn(shapes["text_seq_len"], shapes["text_dim"], generator=g),
        }, pth)
        lines.append(f"r{i},{wav},{pth},{i % 4 != 1:d},{i % 4 != 2:d}")  # some T2A / V2A rows
    torch.save(torch.randn(shapes["text_seq_len"], shapes["text_dim"], generator=g), root / "features" / "empty_string.pt")
    csv = root / "train.csv"
    csv.write_text("\n".join(lines) + "\n")
    return csv


def option_overrides(section: str, opts: SpeedOptions) -> list[str]:
    keys = ["conv_impl", "attention_backend", "compile"]
    if section == "training":
        keys += ["optimizer_impl", "ema_impl"]
    return [f"{section}.{k}={str(getattr(opts, k)).lower()}" for k in keys]


def train_config(args: argparse.Namespace, csv: Path, out: Path, device: torch.device, opts: SpeedOptions, tag: str):
    shapes = condition_shapes(args.preset, args.duration)
    ov = [
        f"model.name={args.preset}", f"data.audio_duration={args.duration}", f"data.target_sample_rate={SAMPLE_RATE}",
        *[f"data.{k}={v}" for k, v in shapes.items()],
        f"data.train_csv={csv}", f"training.output_dir={out}", f"training.experiment_id={tag}",
        f"training.device={device.type}", f"training.batch_size={args.batch}", f"training.precision={args.dtype}",
        f"training.num_workers={args.workers}", "training.tensorboard=false", "training.warmup_steps=0",
        "training.lr=1e-4", "training.repeat_factor=4", "data.validate_features=false",
        *option_overrides("training", opts),
    ]
    return load_config("train.yaml", ov)


def perturb(model: torch.nn.Module, seed: int) -> None:
    """A fresh model outputs 0 (zeroed gates); perturb so every path does real work."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.device) * 0.02)


# ---------------------------------------------------------------------------- phases
class Runner:
    """Interleaves the variants of one phase and collects their numbers."""

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        self.args, self.device = args, device
        self.profiles: dict[str, str] = {}

    def measure(self, phase: str, calls: dict[str, Callable[[], Any]], compiled: dict[str, bool]) -> dict[str, dict[str, Any]]:
        args, dev = self.args, self.device
        out: dict[str, dict[str, Any]] = {v: {} for v in calls}
        for v, fn in calls.items():  # warm-up; with compile the first call compiles
            graphs = dynamo_graphs()
            first = timed(fn, dev)
            rest = [timed(fn, dev) for _ in range(max(args.warmup - 1, 0))]
            if compiled[v]:
                out[v]["compile_seconds"] = first
                out[v]["graphs_compiled"] = dynamo_graphs() - graphs
            out[v]["first_call_seconds"] = first
            del rest
        times: dict[str, list[float]] = {v: [] for v in calls}
        peaks: dict[str, int] = {v: 0 for v in calls}
        graphs = dynamo_graphs()
        for _ in range(args.repeats):
            for v, fn in calls.items():
                with PeakMemory(dev) as mem:
                    times[v].append(timed(fn, dev))
                peaks[v] = max(peaks[v], mem.peak)
        recompiles = dynamo_graphs() - graphs
        for v in calls:
            out[v].update(seconds=statistics.median(times[v]), min_seconds=min(times[v]), all_seconds=times[v],
                          peak_memory_bytes=peaks[v])
            if compiled[v]:
                out[v]["recompiles"] = recompiles
            if args.profile:
                table = profile_table(calls[v], dev)
                self.profiles[f"{phase}/{v}"] = table
                print(f"\n== {phase} [{v}] top operators ==\n{table}")
        return out


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Every requested phase, the variants interleaved, between two measurements of the dense
    matmul rate (the better of the two is the run's yardstick)."""
    device = select_device(args)
    variants = {MAIN: SpeedOptions.reference(), FAST: args.fast_options}
    variants = {k: v for k, v in variants.items() if k in args.variants}
    results = run_header(args, device, variants)
    mm = dense_matmul_rates(device)
    runner = Runner(args, device)
    raw = run_phases(args, device, runner, variants, results)
    # dense matmul again at the end: report the better of the two (the machine's yardstick)
    end = dense_matmul_rates(device)
    mm = {k: max(mm[k], end[k]) for k in mm}
    results["dense_matmul_flops_per_s"] = mm[args.dtype]
    results["dense_matmul_flops_per_s_by_dtype"] = mm
    results["load_average_end"] = _load_average()
    _fill_phases(results, raw, mm, args)
    if runner.profiles:
        results["profiles"] = runner.profiles
    return results


def select_device(args: argparse.Namespace) -> torch.device:
    """--threads applied; --device resolved (auto: CUDA when present), TF32 matmuls on CUDA."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def _load_average() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def run_header(args: argparse.Namespace, device: torch.device,
               variants: dict[str, SpeedOptions]) -> dict[str, Any]:
    """The run's setting (shapes, machine, load, variants) and empty per-phase tables."""
    n = latent_seq_len(SAMPLE_RATE, args.duration, PRESETS[args.preset].latent_dim)
    return {
        "preset": args.preset, "batch": args.batch, "duration_s": args.duration, "sample_rate": SAMPLE_RATE,
        "latent_seq_len": n, "dtype": args.dtype, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu"),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "load_average": _load_average(),
        "variants": {k: v.__dict__ for k, v in variants.items()},
        "phases": {}, "main": {},
    }


def dense_matmul_rates(device: torch.device) -> dict[str, float]:
    """The dense matmul rate per training precision, fp32 first."""
    return {"fp32": dense_matmul_flops_per_s(device, torch.float32),
            "bf16": dense_matmul_flops_per_s(device, torch.bfloat16)}


def run_phases(args: argparse.Namespace, device: torch.device, runner: Runner, variants: dict[str, SpeedOptions],
               results: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """The raw numbers per phase and variant, on trainers over a synthetic data set that lives in
    a temporary folder for the phases' duration; `results` gains params (and sampling_setup)."""
    raw: dict[str, dict[str, dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="wavflow_bench_") as tmp:
        trainers = build_trainers(args, Path(tmp), device, variants)
        any_tr = next(iter(trainers.values()))
        results["params"] = sum(p.numel() for p in any_tr.model.parameters())
        batch = collate_train([any_tr.dataset[i] for i in range(args.batch)])
        compiled = {v: o.compile for v, o in variants.items()}
        if "train_step" in args.phases:
            raw["train_step"] = _train_step_phase(runner, trainers, batch, compiled)
        if "forward" in args.phases:
            raw["forward"] = _forward_phase(runner, trainers, batch, compiled, device)
        if "data" in args.phases:
            raw["data"] = {"loader": _data_phase(args, any_tr)}
        if "sampling" in args.phases:
            raw.update(_sampling(args, device, runner, trainers, variants, compiled, results))
    return raw


def build_trainers(args: argparse.Namespace, root: Path, device: torch.device,
                   variants: dict[str, SpeedOptions]) -> dict[str, Trainer]:
    """One trainer per variant over one synthetic data set written under `root`, all from the
    same perturbed weights (EMAs reset to them) so their steps can be compared."""
    shapes = condition_shapes(args.preset, args.duration)
    csv = write_dataset(root / "data", max(2 * args.batch, 16), SAMPLE_RATE, args.duration, shapes)
    trainers: dict[str, Trainer] = {}
    for v, opts in variants.items():
        trainers[v] = Trainer(train_config(args, csv, root / "out", device, opts, v))
        perturb(trainers[v].model, 1)
        trainers[v].ema1.reset_to(trainers[v].model)
        trainers[v].ema2.reset_to(trainers[v].model)
    return trainers


def _train_step_phase(runner: Runner, trainers: dict[str, Trainer], batch: dict[str, Any],
                      compiled: dict[str, bool]) -> dict[str, dict[str, Any]]:
    """`Trainer.step.update` per variant; with both variants, how far their weights drift."""
    step_flops = _train_step_flops(next(iter(trainers.values())), batch)
    calls = {v: (lambda tr=tr: tr.step.update([batch], lr_epoch=0.0)) for v, tr in trainers.items()}
    measured = runner.measure("train_step", calls, compiled)
    for v in measured:
        measured[v]["flops"] = step_flops
    if MAIN in trainers and FAST in trainers:  # same start, same noise: how far apart after the steps?
        diffs = [(a - b).abs().max().item() for a, b in zip(trainers[MAIN].model.parameters(), trainers[FAST].model.parameters())]
        measured[FAST]["max_param_diff_vs_main"] = max(diffs)
        measured[FAST]["steps_compared"] = trainers[FAST].global_step
    return measured


def _forward_call(tr: Trainer, batch: dict[str, Any]) -> Callable[[], Any]:
    """One network forward under the trainer's autocast, in inference mode, on fixed inputs."""
    dev = tr.device
    x = batch["audio_tokens"].to(dev)
    conds = [batch[k].to(dev) for k in ("clip_features", "sync_features", "text_features")]
    t = torch.rand(x.shape[0], device=dev)

    def run() -> Any:
        with torch.inference_mode(), tr.autocast_factory():
            return tr.forward_model(x, *conds, t)
    return run


def _forward_phase(runner: Runner, trainers: dict[str, Trainer], batch: dict[str, Any],
                   compiled: dict[str, bool], device: torch.device) -> dict[str, dict[str, Any]]:
    """`_forward_call` per variant, the models in eval mode for the phase only."""
    any_tr = next(iter(trainers.values()))
    calls = {v: _forward_call(tr, batch) for v, tr in trainers.items()}
    for tr in trainers.values():
        tr.model.eval()
    with torch.no_grad(), any_tr.autocast_factory():
        x = batch["audio_tokens"].to(device)
        conds = [batch[k].to(device) for k in ("clip_features", "sync_features", "text_features")]
        fwd_flops = count_flops(lambda: any_tr.model(x, *conds, torch.rand(x.shape[0], device=device)))
    measured = runner.measure("forward", calls, compiled)
    for tr in trainers.values():
        tr.model.train()
    for v in measured:
        measured[v]["flops"] = fwd_flops
    return measured


def _data_phase(args: argparse.Namespace, tr: Trainer) -> dict[str, Any]:
    """The trainer's own DataLoader: start-up (to the first batch) apart from the steady rate."""
    loader_batches = args.data_batches

    # One loader over --data-batches batches (the data set repeated as needed): the time to
    # its first batch is the start-up every epoch pays (workers start, prefetch fills), the
    # rest is the steady rate a long epoch sees. Timing only a short epoch mixes the two.
    order = [i % len(tr.dataset) for i in range(loader_batches * args.batch)]

    def load() -> tuple[float, float, int]:
        start = time.perf_counter()
        first, rows = 0.0, 0
        for i, b in enumerate(tr.epoch_loader_of(0, sampler=order)):
            if i == 0:
                first = time.perf_counter() - start
            else:
                rows += len(b.get("id", []))
        return first, time.perf_counter() - start - first, rows

    load()  # warm file caches and workers' imports
    runs = [load() for _ in range(max(1, min(args.repeats, 3)))]
    startup = statistics.median(r[0] for r in runs)
    steady = statistics.median(r[1] for r in runs)
    rows = runs[0][2]
    return {"seconds": steady, "samples_per_s": rows / steady if rows else float("nan"), "rows": rows,
            "startup_seconds": startup, "batches": loader_batches, "workers": args.workers,
            "flops": 0, "peak_memory_bytes": 0}


def _train_step_flops(tr: Any, batch: dict[str, Any]) -> int:
    """FLOPs of forward + backward of one micro-step (the optimizer's elementwise work is not
    counted), leaving the trainer's RNG and gradients as they were."""
    state = tr.state.generator.get_state()
    with torch.random.fork_rng(devices=[]):
        flops = count_flops(lambda: tr.step.micro_step(batch)[0].backward())
    tr.state.generator.set_state(state)
    tr.optimizer.zero_grad(set_to_none=True)
    return flops


def _sampling(args, device, runner, trainers, variants, compiled, results) -> dict[str, Any]:
    # lazy: wavflow.generator pulls torchvision via wavflow.video (~1.5 s and +30 MiB RSS, which
    # would enter the CPU peak-memory figures of the phases run before this one)
    from wavflow.generator import ConditionFeatures, WavFlowGenerator

    shapes = condition_shapes(args.sample_preset, args.sample_duration)
    base = [f"model.name={args.sample_preset}", f"data.audio_duration={args.sample_duration}",
            *[f"data.{k}={v}" for k, v in shapes.items()], f"inference.cfg={args.cfg}", "sampling.method=euler"]
    # main (and the reference loop) run --sample-steps in --sample-dtype; the new path may use
    # fewer steps or bf16 (--fast-sample-steps / --fast-sample-dtype)
    steps = {MAIN: args.sample_steps, FAST: args.fast_sample_steps}
    dtypes = {MAIN: args.sample_dtype, FAST: args.fast_sample_dtype}
    torch.manual_seed(0)
    cfg0 = load_config("infer.yaml", base + option_overrides("inference", SpeedOptions.reference()))
    model = build_model_from_config(cfg0)
    perturb(model, 2)
    gens = {}
    for v, opts in variants.items():
        cfg = load_config("infer.yaml", base + option_overrides("inference", opts) + [
            f"inference.precision={dtypes[v]}", f"sampling.num_steps={steps[v]}"])
        gens[v] = WavFlowGenerator(copy.deepcopy(model), cfg, device=device)
    ref_model = gens[MAIN].model if MAIN in gens else copy.deepcopy(model).to(device).eval()
    b = args.sample_batch
    g = torch.Generator().manual_seed(3)
    items = [ConditionFeatures(clip=torch.randn(shapes["clip_seq_len"], shapes["clip_dim"], generator=g),
                               sync=torch.randn(shapes["sync_seq_len"], shapes["sync_dim"], generator=g),
                               text=torch.randn(shapes["text_seq_len"], shapes["text_dim"], generator=g)) for _ in range(b)]
    seeds = list(range(b))
    any_gen = next(iter(gens.values()))
    outs: dict[str, torch.Tensor] = {}

    def gen_call(v: str) -> Callable[[], Any]:
        def run() -> None:
            outs[v] = gens[v].generate_batch(items, seeds)
        return run

    def reference() -> None:
        outs["reference"] = _reference_euler(ref_model, any_gen, items, seeds, args.cfg, args.sample_steps)

    calls = {v: gen_call(v) for v in gens}
    calls["reference"] = reference
    flags = dict(compiled)
    flags["reference"] = False
    measured = runner.measure("sampling", calls, flags)
    per_call = _sampling_flops(ref_model, any_gen, items, seeds)
    results["sampling_setup"] = {"preset": args.sample_preset, "duration_s": args.sample_duration, "batch": b,
                                 "steps": args.sample_steps, "cfg": args.cfg, "dtype": args.sample_dtype,
                                 "fast_steps": args.fast_sample_steps, "fast_dtype": args.fast_sample_dtype,
                                 "method": "euler", "audio_seconds": b * args.sample_duration}
    ref = outs["reference"]
    out: dict[str, Any] = {"sampling": {}, "sampling_reference": {"reference": measured["reference"]}}
    passes = 2 if args.cfg > 1 else 1  # guidance: two passes of B rows (reference) or one of 2B rows
    out["sampling_reference"]["reference"].update(flops=passes * args.sample_steps * per_call,
                                                  steps=args.sample_steps, dtype="fp32")
    for v in gens:
        out["sampling"][v] = measured[v]
        out["sampling"][v].update(flops=passes * steps[v] * per_call, steps=steps[v], dtype=dtypes[v])
        diff = (outs[v] - ref).abs()
        out["sampling"][v].update(max_abs_diff_vs_reference=diff.max().item(), mean_abs_diff_vs_reference=diff.mean().item(),
                                  output_abs_max=ref.abs().max().item())
    return out


def _reference_euler(model, gen, items, seeds, cfg: float, steps: int) -> torch.Tensor:
    """The reference Euler + CFG loop: two separate network passes per step, fp32, the
    conditions prepared once, empty conditions from batch 1 broadcast (spec §2.11, §3)."""
    with torch.inference_mode():
        x = gen.initial_noise(seeds)
        clip, sync, text = gen.stack_conditions(items)
        b = x.shape[0]
        cond = model.preprocess_conditions(clip, sync, text)
        empty = model.get_empty_conditions(b)
        grid = torch.linspace(0, 1, steps + 1, dtype=torch.float32)
        for i in range(steps):
            t = grid[i]
            tv = t * torch.ones(b, device=x.device)
            pred = model.predict_flow(x, tv, cond)
            if cfg > 1:
                pred = cfg * pred + (1 - cfg) * model.predict_flow(x, tv, empty)
            x = x + (grid[i + 1] - t) * ((pred - x) / torch.clamp(1 - t, min=1e-6))
        audio = unpatchify(x.float() / gen.audio_scale).cpu()
    return audio[:, : gen.num_samples]


def _sampling_flops(model, gen, items, seeds) -> int:
    """FLOPs of one network pass over the B rows (conditions prepared outside)."""
    clip, sync, text = gen.stack_conditions(items)
    x = gen.initial_noise(seeds)
    with torch.no_grad():
        cond = model.preprocess_conditions(clip, sync, text)
        return count_flops(lambda: model.predict_flow(x, torch.full((x.shape[0],), 0.5, device=x.device), cond))


def _fill_phases(results: dict[str, Any], raw: dict[str, Any], mm: dict[str, float], args: argparse.Namespace) -> None:
    """results.phases.<name> = the new path (fast, else main); results.main.<name> = main."""
    rate = mm[args.dtype]
    for phase, by_variant in raw.items():
        for v, r in by_variant.items():
            r.setdefault("flops", 0)
            r["achieved_flops_per_s"] = r["flops"] / r["seconds"] if r["flops"] else 0.0
            dtype_rate = mm[r.get("dtype", args.sample_dtype)] if phase.startswith("sampling") else rate
            r["fraction_of_dense_matmul"] = r["achieved_flops_per_s"] / dtype_rate
            r["fraction_of_fp32_matmul"] = r["achieved_flops_per_s"] / mm["fp32"]
        if phase == "sampling_reference":
            results["phases"][phase] = by_variant["reference"]
            continue
        if phase == "data":
            results["phases"]["data"] = by_variant["loader"]
            continue
        new = by_variant.get(FAST) or by_variant[MAIN]
        results["phases"][phase] = new
        if MAIN in by_variant:
            results["main"][phase] = by_variant[MAIN]
            if FAST in by_variant:
                new["speedup_vs_main"] = by_variant[MAIN]["seconds"] / new["seconds"]
    ph = results["phases"]
    if "train_step" in ph:
        ph["train_step"]["steps_per_s"] = 1.0 / ph["train_step"]["seconds"]
        ph["train_step"]["samples_per_s"] = args.batch / ph["train_step"]["seconds"]
        if "data" in ph:
            ph["data"]["starves_trainer"] = ph["data"]["samples_per_s"] < ph["train_step"]["samples_per_s"]
    if "sampling" in ph:
        s = results["sampling_setup"]
        for r in [ph["sampling"], results["main"].get("sampling"), ph.get("sampling_reference")]:
            if r:
                r["real_time_factor"] = s["audio_seconds"] / r["seconds"]
        if "sampling_reference" in ph:
            ph["sampling"]["fraction_of_reference_time"] = ph["sampling"]["seconds"] / ph["sampling_reference"]["seconds"]


def format_table(results: dict[str, Any]) -> str:
    head = (f"{results['preset']} ({results['params'] / 1e6:.2f} M params)  batch {results['batch']} x "
            f"{results['duration_s']} s (N={results['latent_seq_len']})  {results['dtype']} on {results['device']} "
            f"({results['threads']} threads), load average {results['load_average']}")
    mm = results["dense_matmul_flops_per_s_by_dtype"]
    rows = [f"{'phase':<19} {'main s':>8} {'new s':>8} {'speedup':>7} {'GFLOP':>8} {'GFLOP/s':>8} {'of mm':>6} "
            f"{'peak MiB':>9}  notes"]
    for name, p in results["phases"].items():
        main = results["main"].get(name, {})
        notes = []
        for key in ("compile_seconds", "recompiles", "max_param_diff_vs_main", "max_abs_diff_vs_reference",
                    "fraction_of_reference_time", "real_time_factor", "samples_per_s", "startup_seconds", "starves_trainer"):
            if key in p:
                val = p[key]
                notes.append(f"{key}={val:.3g}" if isinstance(val, float) else f"{key}={val}")
        rows.append(
            f"{name:<19} {main.get('seconds', float('nan')):>8.4f} {p['seconds']:>8.4f} "
            f"{p.get('speedup_vs_main', float('nan')):>7.2f} {p['flops'] / 1e9:>8.2f} "
            f"{p['achieved_flops_per_s'] / 1e9:>8.1f} {100 * p.get('fraction_of_dense_matmul', 0):>5.1f}% "
            f"{p['peak_memory_bytes'] / 2**20:>9.1f}  {' '.join(notes)}"
        )
    foot = f"dense matmul in this run: fp32 {mm['fp32'] / 1e9:.1f} GFLOP/s, bf16 {mm['bf16'] / 1e9:.1f} GFLOP/s"
    return "\n".join([head, *rows, foot, f"new path: {results['variants'].get(FAST, results['variants'].get(MAIN))}"])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    # bf16 activations meet the float32 RMSNorm weights under autocast (as in training); torch
    # warns that it cannot use its fused kernel, which is expected here.
    warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight")
    if args.write_dataset is not None:
        csv = write_dataset(args.write_dataset, max(2 * args.batch, 16), SAMPLE_RATE, args.duration,
                            condition_shapes(args.preset, args.duration))
        print(csv)
        return {"csv": str(csv)}
    results = run_benchmark(args)
    print(format_table(results))
    if args.out is not None:
        atomic_write_text(args.out, json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
