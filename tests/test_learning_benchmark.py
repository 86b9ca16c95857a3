"""The learning benchmark (scripts/bench/learning_benchmark.sh) runs its stages through the real
launchers, forwards its recipe to training, records curves and metrics, and resumes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]


def _bench(out: Path, cache: Path, max_steps: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, WAVFLOW_PYTHON=sys.executable, OMP_NUM_THREADS="1",
               WAVFLOW_CACHE_DIR=str(cache))
    cmd = ["bash", str(REPO / "scripts/bench/learning_benchmark.sh"), f"bench.out_dir={out}",
           "bench.stages=[memorise]", f"bench.memorise.max_steps={max_steps}",
           "bench.memorise.eval_every=2", "bench.batch_size=4", "bench.time_mean=-0.6",
           "bench.time_scale=1.3", "model.name=tiny_16k", "sampling.num_steps=2"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_memorise_stage_records_its_curve_forwards_the_recipe_and_resumes(
        tmp_path: Path, wavflow_cache_dir: Path):
    out = tmp_path / "bench"
    proc = _bench(out, wavflow_cache_dir, 2)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "memorise: target" in proc.stdout

    stage = out / "memorise"
    run = stage / "train/run"
    trained = OmegaConf.load(run / "config.yaml")
    assert (trained.sampling.mean, trained.sampling.scale) == (-0.6, 1.3)
    assert trained.training.batch_size == 4 and trained.training.max_steps == 2
    curve = json.loads((stage / "curve.json").read_text())
    assert [p["step"] for p in curve] == [2]
    for key in ("live_vt2a", "ema_vt2a", "train_seconds", "wall_seconds", "target_met"):
        assert key in curve[0], key
    assert 0.0 <= curve[0]["ema_vt2a"]["nearest_is_own"] <= 1.0
    assert (stage / "curve.png").stat().st_size > 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["git_revision"] and metrics["config"]["model"] == "tiny_16k"
    assert metrics["stages"]["memorise"]["curve"][0]["step"] == 2

    # a larger budget continues the same run: the first point is kept, training goes on from 2
    proc = _bench(out, wavflow_cache_dir, 4)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    curve2 = json.loads((stage / "curve.json").read_text())
    assert [p["step"] for p in curve2] == [2, 4]
    assert curve2[0]["train_seconds"] == curve[0]["train_seconds"]
    log = (run / "training.log").read_text()
    assert "Resumed from" in log and "global step 2," in log
    assert "Stopped by training.max_steps at epoch 1, global step 4;" in log


def test_each_stage_is_evaluated_with_its_own_guidance():
    from wavflow.config import load_config
    from wavflow.demo.learning_benchmark import stage_eval_cfg

    shipped = load_config(REPO / "configs/bench_learning.yaml", job="bench_learning")
    assert stage_eval_cfg(shipped, "generalise") == 1.0 and stage_eval_cfg(shipped, "memorise") == 3.0
    cfg = load_config(REPO / "configs/bench_learning.yaml", ["bench.eval_cfg=2.0", "bench.memorise.eval_cfg=4.0",
                                                            "bench.generalise.eval_cfg=null"], job="bench_learning")
    assert stage_eval_cfg(cfg, "memorise") == 4.0 and stage_eval_cfg(cfg, "generalise") == 2.0


def test_predict_extra_words_replace_the_benchmark_value_of_their_key(monkeypatch, tmp_path: Path):
    """scripts/bench/sampling_quality.py predicts with other sampling settings through the
    benchmark's own predict call: a word for a key the call already sets replaces it (one value
    per key reaches predict.sh), a new key is added."""
    from wavflow.config import load_config
    from wavflow.demo import learning_benchmark as lb

    seen = []
    monkeypatch.setattr(lb, "run_stage", lambda name, script, words, nproc, logs: seen.append(list(words)) or 1.0)
    cfg = load_config(REPO / "configs/bench_learning.yaml", job="bench_learning")
    args = (cfg, "generalise", tmp_path / "h.csv", tmp_path, tmp_path / "c.pth", tmp_path / "o", tmp_path, "t")
    lb._predict(*args, use_ema=True)
    lb._predict(*args, use_ema=True, extra=["sampling.num_steps=12", "inference.cfg=1.5", "inference.precision=bf16"])
    plain, changed = ({w.split("=", 1)[0]: w.split("=", 1)[1] for w in words} for words in seen)
    assert plain["sampling.num_steps"] == "25" and plain["inference.cfg"] == "1.0"
    assert changed["sampling.num_steps"] == "12" and changed["inference.cfg"] == "1.5"
    assert changed["inference.precision"] == "bf16" and "inference.precision" not in plain
    assert sum(w.startswith("sampling.num_steps=") for w in seen[1]) == 1
    assert {k: v for k, v in changed.items() if k not in ("sampling.num_steps", "inference.cfg", "inference.precision")} \
        == {k: v for k, v in plain.items() if k not in ("sampling.num_steps", "inference.cfg")}
