"""2-rank (gloo) extraction runs under torchrun, as users launch them; the merged CSV is fed to
the training data set."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.test_extract import SHORT, overrides, read_errors, read_out_csv, write_dataset
from wavflow.config import load_config
from wavflow.features import extract
from wavflow.manifest import TRAIN_COLUMNS

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


def _env(cache_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        WAVFLOW_CACHE_DIR=str(cache_dir),
        WAVFLOW_PYTHON=sys.executable,
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    env.pop("CONFIG_PATH", None)
    return env


def torchrun_extract(cwd: Path, cache_dir: Path, args: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "wavflow.features.extract", *args]
    return subprocess.run(cmd, cwd=cwd, env=_env(cache_dir), capture_output=True, text=True, timeout=300)


def check_training_dataset_accepts(csv_path: Path, mode: str) -> None:
    """The trainer's own CSV reader, feature check and Dataset take the merged CSV as is."""
    from wavflow.train.dataset import FeatureShapes, TrainDataset, read_train_csvs, select_rows
    from wavflow.train.feature_checks import find_feature_problems
    from wavflow.train.empty_string import load_empty_string_feat

    data = load_config(f"extract_{mode}.yaml", [*SHORT, "data.audio_duration=2.0"], validate=False).data
    rows, reports = read_train_csvs([str(csv_path)], None)
    assert not any(r.problems for r in reports), [r.format() for r in reports]
    shapes = FeatureShapes.from_data_config(data)
    assert find_feature_problems(rows, shapes, show_progress=False) == {}
    good = select_rows(rows, reports, {}, "error")
    dataset = TrainDataset(good, data)
    item = dataset[0]
    assert "failed_row" not in item, item
    assert item["audio_tokens"].shape == (160, 200)  # 2 s at 16 kHz in 200-sample patches
    assert item["text_features"].shape == (77, 1024)
    assert bool(item["video_exist"]) == (mode == "vt2a")
    empty = load_empty_string_feat(good[0].features_path.parent / "empty_string.pt", (77, 1024), "empty string")
    assert empty.shape == (77, 1024)


def test_two_rank_vt2a_errors_merge_and_resume(
    tmp_path: Path, wavflow_cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Write the tiny weights once here rather than in both ranks at the same time.
    from wavflow.features.encoders import ensure_tiny_clip, ensure_tiny_synchformer

    ensure_tiny_clip(wavflow_cache_dir)
    ensure_tiny_synchformer(wavflow_cache_dir)
    ds = write_dataset(tmp_path, videos=True, n=3, corrupt=True)
    # ids in input order: clip0 clip1 clip2 corrupt noaudio; rank 0 gets 0, 2, 4 and rank 1 gets 1, 3.
    args = ["--config", str(REPO / "configs" / "extract_vt2a.yaml"),
            *overrides(tmp_path, ds, "vt2a", "extraction.num_workers=1", "extraction.batch_size=2")]
    proc = torchrun_extract(tmp_path, wavflow_cache_dir, args)
    # 2 of 5 rows fail: above data.max_failed_fraction's 1 %, so exit 1 with the rest written
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "[wavflow.extract] error: 2 of 5 rows of the input CSV failed" in proc.stderr  # torchrun itself, no guard

    out, pth = tmp_path / "out", tmp_path / "out" / "pth"
    df = read_out_csv(out / "train.csv")
    assert tuple(df.columns) == TRAIN_COLUMNS
    assert df["id"].tolist() == ["clip0", "clip1", "clip2"]
    assert df["features_path"].tolist() == [str(pth / f"clip{i}.pth") for i in range(3)]
    assert df["audio_path"].tolist() == [str(ds["data"] / f"a{i}.wav") for i in range(3)]
    assert df["video_exist"].tolist() == ["1"] * 3 and df["text_exist"].tolist() == ["1", "0", "1"]
    for i in range(3):
        feats = torch.load(pth / f"clip{i}.pth", weights_only=True)
        assert isinstance(feats.pop("wavflow_source"), str)  # the input fingerprint
        assert {k: tuple(v.shape) for k, v in feats.items()} == {
            "clip_features": (16, 1024), "sync_features": (40, 768), "text_features": (77, 1024)}
    errors = read_errors(out / "train_errors.log")
    assert list(errors) == ["corrupt", "noaudio"]
    assert "corrupt.mp4" in errors["corrupt"] and "missing.wav" in errors["noaudio"]
    assert sorted(p.name for p in out.iterdir()) == ["pth", "train.csv", "train_errors.log", "train_summary.json"]
    summary = json.loads((out / "train_summary.json").read_text())
    assert (summary["done"], summary["skipped"], summary["failed"], summary["world_size"]) == (3, 0, 2, 2)
    # One log per rank, each naming its real rank; rank 1 met the corrupt video.
    rank1 = (pth / "extract_vt2a_rank1.log").read_text()
    assert "[Rank 1]" in rank1 and "[Rank 0]" not in rank1 and "[SKIP] corrupt" in rank1
    assert "Summary: done=3 skipped=0 failed=2" in (pth / "extract_vt2a_rank0.log").read_text()
    check_training_dataset_accepts(out / "train.csv", "vt2a")

    # Second run, in this process (world size 1: resume does not depend on the rank count):
    # nothing is encoded, no model is loaded, every row is still listed.
    def refuse(*a: Any, **k: Any) -> None:
        raise AssertionError("the re-run must not build encoders")

    monkeypatch.setattr(extract, "build_encoders", refuse)
    again = extract.run_extraction(load_config(args[1], args[2:], validate=False))
    assert (again.done, again.skipped, again.failed, again.rows) == (0, 3, 2, 3)
    assert read_out_csv(out / "train.csv").equals(df)
    assert list(read_errors(out / "train_errors.log")) == ["corrupt", "noaudio"]
    summary = json.loads((out / "train_summary.json").read_text())
    assert (summary["done"], summary["skipped"], summary["failed"], summary["world_size"]) == (0, 3, 2, 1)


def test_two_rank_t2a_through_the_launcher(tmp_path: Path, wavflow_cache_dir: Path) -> None:
    ds = write_dataset(tmp_path, videos=False, n=3)
    env = _env(wavflow_cache_dir)
    env["NPROC_PER_NODE"] = "2"
    env["CONFIG_PATH"] = str(REPO / "configs" / "extract_t2a.yaml")
    # the launcher passes extraction.mode=t2a itself
    words = [w for w in overrides(tmp_path, ds, "t2a") if not w.startswith("extraction.mode")]
    words.append("data.max_failed_fraction=0.5")  # the data set's one row without audio is allowed here
    proc = subprocess.run(["bash", str(REPO / "scripts" / "launch" / "extract_t2a.sh"), *words],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "--nproc_per_node=2" in proc.stderr

    out, pth = tmp_path / "out", tmp_path / "out" / "pth"
    df = read_out_csv(out / "train.csv")
    assert df["id"].tolist() == ds["good"]
    assert df["video_exist"].tolist() == ["0"] * 3 and df["text_exist"].tolist() == ["1", "0", "1"]
    for sample_id in ds["good"]:
        assert sorted(torch.load(pth / f"{sample_id}.pth", weights_only=True)) == ["text_features", "wavflow_source"]
    assert list(read_errors(out / "train_errors.log")) == ["noaudio"]
    for rank in (0, 1):
        log = (pth / f"extract_t2a_rank{rank}.log").read_text()
        assert f"[Rank {rank}]" in log and "Synchformer True" not in log
    check_training_dataset_accepts(out / "train.csv", "t2a")
