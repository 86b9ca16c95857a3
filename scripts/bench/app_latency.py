"""How fast the web page answers: start-up, first page load and request latency.

    python scripts/bench/app_latency.py [--checkpoint RUN/checkpoint_latest.pth] [--steps 25] [--repeats 3]

Starts `python -m wavflow.app` on a free loopback port (a tiny_16k checkpoint with random
weights and the built-in tiny encoders unless --checkpoint is given), then times, through
Gradio's own client: seconds until the page answers, the first page load (HTML), the first T2A
request (it loads the text encoder), then the median of --repeats T2A, VT2A (a 1.5 s video is
written) and compare-modes requests. Prints one JSON object. Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import av
import numpy as np
import torch
from gradio_client import Client, handle_file
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a plain clone too

from wavflow.config import load_config  # noqa: E402
from wavflow.io_utils import atomic_torch_save  # noqa: E402
from wavflow.model import build_model_from_config  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def random_checkpoint(folder: Path) -> Path:
    """A trainer-format tiny_16k checkpoint of 1 s clips with small random weights."""
    cfg = load_config("infer.yaml", ["model.name=tiny_16k", "data.audio_duration=1.0", "data.clip_seq_len=8",
                                     "data.sync_seq_len=16", "encoders.profile=tiny"])
    model = build_model_from_config(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    sd = model.state_dict()
    ckpt = {"model": sd, "model_ema1": sd, "model_ema2": sd, "epoch": 1, "global_step": 20000,
            "config": OmegaConf.to_yaml(cfg)}
    return atomic_torch_save(ckpt, folder / "checkpoint_latest.pth")


def write_clip(path: Path) -> Path:
    with av.open(str(path), "w") as box:
        stream = box.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        for i in range(38):
            img = np.full((64, 96, 3), (i * 6) % 255, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                box.mux(packet)
        for packet in stream.encode():
            box.mux(packet)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="a checkpoint to serve (default: a random tiny_16k one)")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ckpt = Path(args.checkpoint) if args.checkpoint else random_checkpoint(root)
        clip = write_clip(root / "clip.mp4")
        port = free_port()
        env = {**os.environ, "WAVFLOW_CACHE_DIR": os.environ.get("WAVFLOW_CACHE_DIR", str(root / "cache"))}
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "wavflow.app", f"model.ckpt_path={ckpt}", "encoders.profile=tiny",
                                 f"output.output_dir={root / 'out'}", "--port", str(port)],
                                cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}/"
        try:
            while True:
                if proc.poll() is not None:
                    raise SystemExit(f"the app exited with {proc.returncode}")
                try:
                    urllib.request.urlopen(url, timeout=2).read()
                    break
                except OSError:
                    time.sleep(0.1)
            startup = time.perf_counter() - start
            page = timed(lambda: urllib.request.urlopen(url, timeout=30).read())
            client = Client(url, verbose=False)
            knobs = (args.steps, 1.5, "", "euler", 3, 1.0, True)

            def t2a():
                client.predict(None, "two sharp clicks", *knobs, api_name="/generate")

            def vt2a():
                client.predict(handle_file(str(clip)), "two sharp clicks", *knobs, api_name="/generate")

            def compare():
                client.predict(handle_file(str(clip)), "two sharp clicks", *knobs, api_name="/compare_modes")

            first_t2a = timed(t2a)
            first_vt2a = timed(vt2a)
            result = {
                "steps": args.steps, "torch_threads": torch.get_num_threads(), "cpu": os.cpu_count(),
                "startup_until_page_answers_s": round(startup, 2), "page_load_s": round(page, 3),
                "first_t2a_s": round(first_t2a, 2), "first_vt2a_s": round(first_vt2a, 2),
                "t2a_median_s": round(statistics.median(timed(t2a) for _ in range(args.repeats)), 2),
                "vt2a_median_s": round(statistics.median(timed(vt2a) for _ in range(args.repeats)), 2),
                "compare_modes_median_s": round(statistics.median(timed(compare) for _ in range(args.repeats)), 2),
            }
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
