"""The learning benchmark's finetune stage (wavflow/demo/finetune_stage.py): which clips pre-train,
fine-tune and evaluate, per-mode scoring of every evaluation clip in all three modes, the targets,
and the whole stage through the real launchers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
from omegaconf import OmegaConf

from wavflow.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory):
    from wavflow.demo.make_dataset import make_dataset

    root = tmp_path_factory.mktemp("ft_data")
    return make_dataset(root, n=60, seed=0, duration=1.0, sample_rate=16000, holdout_frac=0.4, no_caption_frac=1 / 3,
                        no_video_frac=1 / 3, progress=False)


def test_split_leaves_the_new_class_out_and_takes_its_first_training_clips(dataset):
    from wavflow.demo.finetune_stage import plan_split

    split = plan_split(dataset, "chirp", clips=4, replay_clips=7, old_eval_per_class=2)
    by_id = dataset.by_id()
    new_train = sorted(c.id for c in dataset.split("train") if c.label == "chirp")
    assert split.finetune_ids == new_train[:4]
    # replay: old classes in turn, training clips only, never the new class
    labels = [by_id[i].label for i in split.replay_ids]
    assert len(split.replay_ids) == 7 and "chirp" not in labels and len(set(labels[:5])) == 5
    assert all(by_id[i].split == "train" for i in split.replay_ids)
    assert {c.label for c in split.new_eval} == {"chirp"} and all(c.split == "holdout" for c in split.new_eval)
    assert len(split.new_eval) == sum(c.label == "chirp" for c in dataset.split("holdout"))
    old = [c.label for c in split.old_eval]
    assert "chirp" not in old and all(old.count(k) == 2 for k in set(old)) and len(set(old)) == 5

    with pytest.raises(ConfigError, match="bench.finetune.new_class: 'harp'"):
        plan_split(dataset, "harp", 4, 0, 2)
    with pytest.raises(ConfigError, match="bench.finetune.clips=40, but the data set has 6 training clips"):
        plan_split(dataset, "chirp", 40, 0, 2)


def test_every_evaluation_clip_is_asked_for_in_all_three_modes(dataset):
    from wavflow.demo.finetune_stage import eval_rows

    clip = dataset.split("holdout")[0]
    rows = eval_rows([clip]).set_index("id")
    assert list(rows.index) == [f"{clip.id}__vt2a", f"{clip.id}__t2a", f"{clip.id}__v2a"]
    assert rows.loc[f"{clip.id}__vt2a"].tolist() == [clip.video_path, clip.description, 1, 1]
    assert rows.loc[f"{clip.id}__t2a"].tolist() == ["", clip.description, 0, 1]
    assert rows.loc[f"{clip.id}__v2a"].tolist() == [clip.video_path, "", 1, 0]
    assert clip.description  # a V2A-assigned clip keeps its class caption for the T2A row


def test_each_mode_is_scored_on_its_own_files(dataset, tmp_path: Path):
    """Real audio as every mode's output names every class; the V2A files swapped for clips of
    another class fail V2A alone (a scorer reading another mode's files, or pooling, would not)."""
    from wavflow.demo.finetune_stage import plan_split, score_modes
    from wavflow.demo.metrics import fit_reference

    split = plan_split(dataset, "chirp", 4, 0, 2)
    clips = split.new_eval + split.old_eval
    other = {c.id: next(o for o in clips if o.label != c.label) for c in clips}
    for c in clips:
        for mode in ("vt2a", "t2a"):
            shutil.copy(dataset.root / c.audio_path, tmp_path / f"{c.id}__{mode}.wav")
        shutil.copy(dataset.root / other[c.id].audio_path, tmp_path / f"{c.id}__v2a.wav")
    ref = fit_reference(dataset)
    scores = score_modes(tmp_path, ref, clips)
    assert set(scores) == {"VT2A", "T2A", "V2A"}
    for mode in ("VT2A", "T2A"):
        assert scores[mode]["n"] == len(clips) and scores[mode]["class_accuracy"] == 1.0
        assert scores[mode]["chance_accuracy"] == pytest.approx(1 / 6)
        assert scores[mode]["level_diff_db"] == pytest.approx(0.0, abs=1e-6)
    assert scores["VT2A"]["onset_median_ms"] < 25.0
    assert scores["V2A"]["class_accuracy"] == 0.0


def test_train_log_figures_read_what_the_trainer_logs(tmp_path: Path):
    from wavflow.demo.finetune_stage import train_log_figures

    log = tmp_path / "training.log"
    log.write_text(
        "... - INFO - Number of trainable parameters: 0.151552M of 5.882376M (2.58 %) (LoRA rank 8)\n"
        "... - INFO - Epoch [1/9] Step [1/1] GlobalStep 25 Loss: 0.5 LR: 1e-4 GradNorm: 1.0 Throughput: 10.0 samples/s\n"
        "... - INFO - Epoch [9/9] Step [1/1] GlobalStep 50 Loss: 0.5 LR: 1e-4 GradNorm: 1.0 Throughput: 64.0 samples/s\n"
        "... - INFO - Epoch [9/9] Step [1/1] GlobalStep 75 Loss: 0.5 LR: 1e-4 GradNorm: 1.0 Throughput: 32.0 samples/s\n"
        "... - INFO - Peak memory: 997 MB (resident set, rank 0); training state 70.8 MB on rank 0 (weights, "
        "gradients, AdamW, EMAs; training.strategy=ddp)\n")
    figures = train_log_figures(log, batch_size=16)
    # the first interval holds the start-up and is left out: median of 64 and 32 samples/s
    assert figures == {"trainable_params": 151552, "total_params": 5882376, "step_seconds": 0.3333, "peak_mb": 997,
                       "state_mb": 70.8}
    assert train_log_figures(tmp_path / "missing.log", 16)["step_seconds"] is None


def _modes(acc: float, onset: float | None = 20.0) -> dict:
    return {m: {"n": 12, "chance_accuracy": 1 / 6, "class_accuracy": acc,
                "onset_median_ms": None if m == "T2A" else onset} for m in ("VT2A", "T2A", "V2A")}


def test_a_way_is_judged_on_the_new_class_forgetting_and_time():
    from wavflow.config import load_config
    from wavflow.demo.finetune_stage import judge_way

    targets = load_config(REPO / "configs/bench_learning.yaml", job="bench_learning").bench.targets.finetune
    before = {"new": _modes(0.0, 1000.0), "old": _modes(0.8)}
    good = {"new": _modes(0.85, 30.0), "old": _modes(0.75), "train_seconds": 300.0}
    judged = judge_way(good, before, targets)
    assert judged["target_met"] and judged["old_keep"] == {"VT2A": 0.9375, "T2A": 0.9375, "V2A": 0.9375}
    assert set(judged["targets"]) == {"new_class_acc.VT2A", "new_class_acc.V2A", "new_onset_ms.VT2A",
                                      "new_onset_ms.V2A", "old_keep.VT2A", "old_keep.T2A", "old_keep.V2A",
                                      "train_minutes"}
    forgot = {**good, "old": {**good["old"], "T2A": {**good["old"]["T2A"], "class_accuracy": 0.7}}}
    assert [k for k, v in judge_way(forgot, before, targets)["targets"].items() if not v] == ["old_keep.T2A"]
    late = {**good, "new": _modes(0.85, 61.0)}
    assert [k for k, v in judge_way(late, before, targets)["targets"].items() if not v] == \
        ["new_onset_ms.VT2A", "new_onset_ms.V2A"]
    slow = {**good, "train_seconds": 601.0}
    assert [k for k, v in judge_way(slow, before, targets)["targets"].items() if not v] == ["train_minutes"]
    with pytest.raises(ConfigError, match="bench.targets.finetune.new_class_acc: unknown modes"):
        judge_way(good, before, OmegaConf.create({"new_class_acc": {"TV": 0.8}}))


def test_way_words_name_the_presets_last_block():
    from wavflow.config import load_config
    from wavflow.demo.finetune_stage import way_words

    st = load_config(REPO / "configs/bench_learning.yaml", job="bench_learning").bench.finetune
    assert list(st.ways) == ["full", "last_block", "lora"]
    assert way_words(st, "last_block", "tiny_16k") == ["training.trainable=[fused_blocks.1.*,final_layer.*]"]
    assert way_words(st, "lora", "tiny_16k") == ["training.lora.rank=8"] and way_words(st, "full", "tiny_16k") == []


def test_only_ways_picks_ways_by_name_and_refuses_unknown_ones():
    from wavflow.config import load_config
    from wavflow.demo.finetune_stage import selected_ways

    path = REPO / "configs/bench_learning.yaml"
    assert selected_ways(load_config(path, job="bench_learning").bench.finetune) == ["full", "last_block", "lora"]
    st = load_config(path, ["bench.finetune.only_ways=[lora,full]"], job="bench_learning").bench.finetune
    assert selected_ways(st) == ["lora", "full"]
    st = load_config(path, ["bench.finetune.only_ways=[qlora]"], job="bench_learning").bench.finetune
    with pytest.raises(ConfigError, match=r"bench.finetune.only_ways: \['qlora'\] are not ways"):
        selected_ways(st)


def _run(out: Path, cache: Path, ways: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, WAVFLOW_PYTHON=sys.executable, OMP_NUM_THREADS="1", WAVFLOW_CACHE_DIR=str(cache))
    cmd = ["bash", str(REPO / "scripts/bench/learning_benchmark.sh"), f"bench.out_dir={out}", "bench.stages=[finetune]",
           "bench.finetune.n=36", "bench.finetune.clips=2", "bench.finetune.replay_clips=1",
           "bench.finetune.pretrain_steps=2", "bench.finetune.steps=2", "bench.finetune.old_eval_clips_per_class=1",
           "bench.finetune.batch_size=2", "bench.batch_size=2", "sampling.num_steps=2", ways]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_finetune_stage_pretrains_without_the_class_and_fine_tunes_each_way(tmp_path: Path, wavflow_cache_dir: Path):
    out = tmp_path / "bench"
    ways = "bench.finetune.ways={full: [], last_block: ['training.trainable=[fused_blocks.{last_fused_block}.*]'], " \
           "lora: ['training.lora.rank=4']}"
    proc = _run(out, wavflow_cache_dir, ways)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "finetune: targets met by" in proc.stdout
    stage = out / "finetune"
    events = json.loads((stage / "data/events.json").read_text())
    label = {c["id"]: c["label"] for c in events["clips"]}

    def ids(csv: Path) -> list[str]:
        return pd.read_csv(csv, dtype={"id": str})["id"].tolist()

    pretrain_csvs = sorted((stage / "features").glob("pretrain_*.csv"))
    assert pretrain_csvs and all(label[i] != "chirp" for p in pretrain_csvs for i in ids(p))
    tuned = [i for p in sorted((stage / "features").glob("finetune_*.csv")) for i in ids(p)]
    assert sorted(label[i] for i in tuned).count("chirp") == 2 and len(tuned) == 3  # 2 clips + 1 replay

    metrics = json.loads((out / "metrics.json").read_text())["stages"]["finetune"]
    assert metrics["new_class"] == "chirp" and set(metrics["ways"]) == {"full", "last_block", "lora"}
    assert metrics["before"]["new"]["V2A"]["n"] == metrics["eval_clips"]["new"] > 0
    base = stage / "pretrain/run/checkpoint_latest.pth"
    for way, w in metrics["ways"].items():
        run = stage / "ways" / way / way
        config = OmegaConf.load(run / "config.yaml")
        assert Path(config.training.init_from) == base and config.training.init_from_ema is True
        assert w["trainable_params"] and w["peak_mb"] and w["step_seconds"] and w["train_seconds"] > 0
        assert set(w["new"]) == set(w["old"]) == {"VT2A", "T2A", "V2A"} and "old_keep" in w
    shares = {way: w["trainable_params"] / w["total_params"] for way, w in metrics["ways"].items()}
    assert shares["lora"] < 0.05 < shares["last_block"] < 0.5 < shares["full"]
    assert (stage / "ways/lora/lora/merged_checkpoint_latest.pth").is_file()  # LoRA predicts merged

    # a second run trains nothing again: the finished ways and the pre-training are reused
    stamp = {p: p.stat().st_mtime for p in (stage / "ways").glob("*/result.json")}
    proc = _run(out, wavflow_cache_dir, ways)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert {p: p.stat().st_mtime for p in stamp} == stamp
    assert "=== [finetune_" not in proc.stdout and "=== [train_to_" not in proc.stdout
    # other fine-tuning settings in the same folder are refused, not mixed in
    proc = _run(out, wavflow_cache_dir, ways.replace("rank=4", "rank=2"))
    assert proc.returncode != 0 and "finetune way lora run made with other settings (words)" in proc.stdout + proc.stderr


def test_shipped_finetune_sizes_give_sixteen_clips_and_twelve_held_out_per_class():
    from collections import Counter

    from wavflow.config import load_config
    from wavflow.demo.make_dataset import _plan_clips, CLASS_NAMES
    from wavflow.demo.instruments import INSTRUMENT_NAMES

    for config, classes in (("bench_learning.yaml", CLASS_NAMES), ("bench_learning_instruments.yaml", INSTRUMENT_NAMES)):
        st = load_config(REPO / "configs" / config, job="bench_learning").bench.finetune
        split, labels, _ = _plan_clips(int(st.n), 0, float(st.holdout_frac), float(st.no_caption_frac),
                                       float(st.no_video_frac), classes)
        counts = Counter(zip(split, labels))
        assert st.new_class in classes
        assert counts[("train", st.new_class)] >= st.clips == 16 and counts[("holdout", st.new_class)] >= 12
        assert min(counts[("holdout", k)] for k in classes) >= st.old_eval_clips_per_class


def test_a_missing_mode_file_is_an_error_naming_it(dataset, tmp_path: Path):
    from wavflow.demo.finetune_stage import score_modes
    from wavflow.demo.metrics import fit_reference
    from wavflow.errors import WavFlowError

    clip = dataset.split("holdout")[0]
    sf.write(tmp_path / f"{clip.id}__vt2a.wav", np.zeros(16000, dtype=np.float32), 16000)
    with pytest.raises((WavFlowError, FileNotFoundError), match=f"{clip.id}__t2a"):
        score_modes(tmp_path, fit_reference(dataset), [clip])
