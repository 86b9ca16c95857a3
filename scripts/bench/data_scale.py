"""Training data at scale: start-up and steady read rate of the training rows for a large CSV of
cached features (TRAINING.md, "Sharded training (FSDP) and memory": Large data sets).

    python scripts/bench/data_scale.py [--rows 100000] [--distinct 256] [--duration 8] [--workers 0,2]
        [--batches 40] [--layouts rows,packed] [--shard-rows 256] [--out DIR] [--json OUT]

Writes `--distinct` feature files and wavs of real 8 s shapes (CLIP 64 x 1024, Synchformer 192 x
768, text 77 x 1024, 16 kHz audio; about 1.1 MB + 256 KB each) and a CSV of `--rows` rows that
cycle through them under ids of their own, then measures what a training process does with it:
start-up (`prepare_rows`: reading the CSV, checking ids, flags and files, and with
`data.validate_features=true` opening every feature file; then a restart, which opens only the
files changed since they passed) and the steady rate of the training
loader as the trainer builds it per epoch (rows per second over `--batches` batches of 16 after
the first, and the first batch's time, per number of workers). The distinct files repeat, so the page cache holds them after the
first pass: the figures are the loader's own cost, not a disk's. The packed layout
(`--layouts packed`) holds the same rows in shards of `--shard-rows` rows (sparse files: their data
are zeros read from the page cache, so no 117 GB are written) and is measured the same way. Not a
test: run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from wavflow.config import load_config  # noqa: E402
from wavflow.distributed import DistInfo  # noqa: E402
from wavflow.shapes import video_seq_lens  # noqa: E402
from wavflow.train.dataset import TrainDataset  # noqa: E402
from wavflow.train.epoch_data import epoch_loader, prepare_rows  # noqa: E402
from wavflow.train.feature_checks import CHECKS_NAME  # noqa: E402

SR = 16000


def write_set(root: Path, rows: int, distinct: int, duration: float) -> tuple[Path, dict[str, int]]:
    clip_len, sync_len = video_seq_lens(duration)
    shapes = {"clip_seq_len": clip_len, "sync_seq_len": sync_len}
    gen = torch.Generator().manual_seed(0)
    (root / "features").mkdir(parents=True, exist_ok=True)
    (root / "audio").mkdir(exist_ok=True)
    for i in range(distinct):
        torch.save({"clip_features": torch.randn(clip_len, 1024, generator=gen),
                    "sync_features": torch.randn(sync_len, 768, generator=gen),
                    "text_features": torch.randn(77, 1024, generator=gen)}, root / "features" / f"f{i:05d}.pth")
        sf.write(root / "audio" / f"a{i:05d}.wav", np.random.default_rng(i).normal(0, 0.1, int(duration * SR)), SR)
    lines = ["id,audio_path,features_path,video_exist,text_exist"]
    lines += [f"row{r:07d},audio/a{r % distinct:05d}.wav,features/f{r % distinct:05d}.pth,1,1" for r in range(rows)]
    csv = root / "train.csv"
    csv.write_text("\n".join(lines) + "\n")
    return csv, shapes


def write_packed_set(root: Path, rows: int, distinct: int, duration: float, shard_rows: int) -> Path:
    """The same rows as a packed store (wavflow/features/packed.py): shards of `shard_rows` rows
    whose headers list real shapes and whose data are holes of a sparse file (zeros, read from
    the page cache like the per-row set's repeated files), so 100,000 rows of 8 s features (117
    GB) take no disk. Written by hand in the safetensors layout: 8-byte header length, JSON
    header, data."""
    clip_len, sync_len = video_seq_lens(duration)
    shapes = {"clip_features": [clip_len, 1024], "sync_features": [sync_len, 768], "text_features": [77, 1024]}
    out = root / "packed"
    out.mkdir(parents=True, exist_ok=True)
    lines = ["id,audio_path,features_path,video_exist,text_exist,features_key"]
    for number, start in enumerate(range(0, rows, shard_rows)):
        path = out / f"train_{number:05d}.safetensors"
        header: dict = {"__metadata__": {"format": "wavflow-packed-features/1"}}
        offset = 0
        for r in range(start, min(start + shard_rows, rows)):
            for name, shape in shapes.items():
                size = 4 * shape[0] * shape[1]
                header[f"row{r:07d}/{name}"] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
                offset += size
            lines.append(f"row{r:07d},{root}/audio/a{r % distinct:05d}.wav,{path},1,1,row{r:07d}")
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        with open(path, "wb") as f:
            f.write(len(text).to_bytes(8, "little") + text)
            f.truncate(8 + len(text) + offset)
    csv = out / "train.csv"
    csv.write_text("\n".join(lines) + "\n")
    return csv


def measure_startups(root: Path, csv: Path, shapes: dict[str, int], duration: float, layout: str,
                     result: dict) -> list:
    """Start-up without and with the feature check, then a restart (the run folder's record)."""
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None)
    record = root / f"{layout}_{CHECKS_NAME}"  # a run folder's record of the feature files that passed
    record.unlink(missing_ok=True)
    for validate, start in ((False, "first"), (True, "first"), (True, "restart")):
        cfg = training_config(root, csv, shapes, duration, validate)
        t0 = time.perf_counter()
        rows = prepare_rows(cfg.data, info, record)
        seconds = time.perf_counter() - t0
        key = f"{layout}_startup_s_validate_{str(validate).lower()}" + ("_restart" if start == "restart" else "")
        result[key] = round(seconds, 2)
        print(f"{layout}: start-up ({start}), data.validate_features={str(validate).lower():5s}: {seconds:.1f} s "
              f"for {len(rows):,d} rows", flush=True)
    return rows


def training_config(root: Path, csv: Path, shapes: dict[str, int], duration: float, validate: bool):
    return load_config(ROOT / "configs/train.yaml", [
        f"data.train_csv={csv}", f"data.data_root={root}", f"data.audio_duration={duration}",
        f"data.clip_seq_len={shapes['clip_seq_len']}", f"data.sync_seq_len={shapes['sync_seq_len']}",
        "model.name=medium_16k", f"data.validate_features={str(validate).lower()}"], job="train")


def measure_loader(rows: list, cfg, workers_list: list[int], batches: int, layout: str, result: dict) -> None:
    """Rows per second over `batches` batches of 16 after the first, per number of workers."""
    dataset = TrainDataset(rows, cfg.data)
    for workers in workers_list:
        loader = epoch_loader(dataset, list(range(len(dataset))), batch_size=16, num_workers=workers, seed=0,
                              rank=0, epoch=0, pin_memory=False)
        it = iter(loader)
        t0 = time.perf_counter()
        next(it)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(batches):
            next(it)
        rate = 16 * batches / (time.perf_counter() - t0)
        result[f"{layout}_rows_per_s_workers_{workers}"] = round(rate, 1)
        result[f"{layout}_first_batch_s_workers_{workers}"] = round(first, 2)
        print(f"{layout}: loader, {workers} worker(s): first batch {first:.2f} s, then {rate:.1f} rows/s", flush=True)
        del it, loader


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--distinct", type=int, default=256)
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--workers", default="0,2")
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--layouts", default="rows,packed", help="rows: one .pth per row; packed: shards")
    p.add_argument("--shard-rows", type=int, default=256)
    p.add_argument("--out", type=Path, default=None, help="keep the data set here (default: a temporary folder)")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()
    workers = [int(w) for w in a.workers.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        root = a.out or Path(tmp)
        t0 = time.perf_counter()
        csv, shapes = write_set(root, a.rows, a.distinct, a.duration)
        print(f"wrote {a.rows:,d} rows over {a.distinct} feature files in {time.perf_counter() - t0:.1f} s", flush=True)
        result: dict = {"rows": a.rows, "distinct_files": a.distinct, "duration": a.duration,
                        "shard_rows": a.shard_rows}
        layouts = a.layouts.split(",")
        if "rows" in layouts:
            rows = measure_startups(root, csv, shapes, a.duration, "rows", result)
            measure_loader(rows, training_config(root, csv, shapes, a.duration, True), workers, a.batches, "rows", result)
        if "packed" in layouts:
            t0 = time.perf_counter()
            packed = write_packed_set(root, a.rows, a.distinct, a.duration, a.shard_rows)
            print(f"wrote {a.rows:,d} rows as {-(-a.rows // a.shard_rows)} sparse shards in "
                  f"{time.perf_counter() - t0:.1f} s", flush=True)
            rows = measure_startups(root, packed, shapes, a.duration, "packed", result)
            measure_loader(rows, training_config(root, packed, shapes, a.duration, True), workers, a.batches, "packed",
                           result)
    if a.json:
        a.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
