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
    lb.predict_stage(*args, use_ema=True)
    lb.predict_stage(*args, use_ema=True, extra=["sampling.num_steps=12", "inference.cfg=1.5", "inference.precision=bf16"])
    plain, changed = ({w.split("=", 1)[0]: w.split("=", 1)[1] for w in words} for words in seen)
    assert plain["sampling.num_steps"] == "25" and plain["inference.cfg"] == "1.0"
    assert changed["sampling.num_steps"] == "12" and changed["inference.cfg"] == "1.5"
    assert changed["inference.precision"] == "bf16" and "inference.precision" not in plain
    assert sum(w.startswith("sampling.num_steps=") for w in seen[1]) == 1
    assert {k: v for k, v in changed.items() if k not in ("sampling.num_steps", "inference.cfg", "inference.precision")} \
        == {k: v for k, v in plain.items() if k not in ("sampling.num_steps", "inference.cfg")}


def _groups(class_acc: dict, onset_ms: dict, frechet_ratio: float | None, rows: dict | None = None) -> dict:
    """metrics.json groups (wavflow/demo/metrics.py) with the figures the generalise stage judges."""
    rows = rows or {"VT2A": 34, "T2A": 7, "V2A": 7}
    groups = {m: {"n": rows[m], "chance_accuracy": 1 / 6, "class_accuracy": class_acc.get(m),
                  "onset_median_ms": onset_ms.get(m), "onset_detection_rate": 1.0, "num_reference_onsets": 2 * rows[m],
                  "level_diff_db": 0.5, "noise_floor_diff_db": -1.0} for m in rows}
    groups["overall"] = {"n": sum(rows.values()), "frechet_ratio": frechet_ratio}
    return groups


def test_generalise_targets_are_judged_per_mode_never_pooled(tmp_path: Path):
    from wavflow.config import load_config
    from wavflow.demo import learning_benchmark as lb
    from wavflow.errors import WavFlowError

    targets = load_config(REPO / "configs/bench_learning.yaml", job="bench_learning").bench.targets.generalise
    assert dict(targets.class_acc) == {"VT2A": 0.95, "T2A": 0.9, "V2A": 0.9}
    assert dict(targets.onset_ms) == {"VT2A": 20.0, "V2A": 20.0} and targets.frechet_ratio == 5.0
    good = {"VT2A": 1.0, "T2A": 0.9, "V2A": 0.95}
    onsets = {"VT2A": 3.0, "V2A": 20.0, "T2A": 400.0}  # T2A has no video: its timing is not judged
    point = lb.judge_generalise(_groups(good, onsets, 4.0), targets)
    assert point["target_met"] and all(point["targets"].values())
    assert set(point["targets"]) == {"class_acc.VT2A", "class_acc.T2A", "class_acc.V2A", "onset_ms.VT2A",
                                     "onset_ms.V2A", "frechet_ratio"}
    assert point["class_accuracy"] == good and point["rows"] == {"VT2A": 34, "T2A": 7, "V2A": 7}
    assert point["onset_median_ms"]["V2A"] == 20.0 and point["frechet_ratio"] == 4.0
    assert point["level_diff_db"]["T2A"] == 0.5 and point["noise_floor_diff_db"]["VT2A"] == -1.0

    # T2A at 2 of 7 would pass a pooled text-conditioned figure ((34 + 2) / 41 = 0.88 >= 0.8): per mode it fails
    weak_t2a = lb.judge_generalise(_groups({**good, "T2A": 2 / 7}, onsets, 4.0), targets)
    assert not weak_t2a["target_met"] and [k for k, v in weak_t2a["targets"].items() if not v] == ["class_acc.T2A"]
    late_v2a = lb.judge_generalise(_groups(good, {**onsets, "V2A": 20.5}, 4.0), targets)
    assert [k for k, v in late_v2a["targets"].items() if not v] == ["onset_ms.V2A"]
    far = lb.judge_generalise(_groups(good, onsets, 5.5), targets)
    assert [k for k, v in far["targets"].items() if not v] == ["frechet_ratio"]
    # a mode without rows has no figures: it has not shown that it learns
    no_v2a = lb.judge_generalise(_groups({**good, "V2A": None}, {**onsets, "V2A": None}, 4.0,
                                         rows={"VT2A": 34, "T2A": 7, "V2A": 0}), targets)
    assert not no_v2a["target_met"] and not no_v2a["targets"]["class_acc.V2A"]

    bad = OmegaConf.create({"class_acc": {"text_conditioned": 0.8}, "onset_ms": {}, "frechet_ratio": None})
    with pytest.raises(WavFlowError, match="unknown modes"):
        lb.judge_generalise(_groups(good, onsets, 4.0), bad)

    # curve.json and the PNG carry one series per mode of each target
    series = lb.generalise_series(targets)
    assert series == [("class_accuracy", "VT2A"), ("class_accuracy", "T2A"), ("class_accuracy", "V2A"),
                      ("onset_median_ms", "VT2A"), ("onset_median_ms", "V2A"), ("frechet_ratio", None)]
    lb._write_curve(tmp_path, [{"step": 500, **point}, {"step": 1000, **weak_t2a}], "generalise", series)
    saved = json.loads((tmp_path / "curve.json").read_text())
    assert saved[1]["class_accuracy"]["T2A"] == pytest.approx(2 / 7) and saved[1]["target_met"] is False
    assert (tmp_path / "curve.png").stat().st_size > 0


# ------------------------------------------------------------------------------ robustness
def _fake_pipeline(monkeypatch, groups_of) -> dict[str, list]:
    """make_dataset, the launchers and the metrics replaced by recorders: nothing is made, trained
    or scored. `groups_of(variation name)` gives the metrics groups its predictions score."""
    from wavflow.demo import learning_benchmark as lb

    calls: dict[str, list] = {"data": [], "stages": []}

    def make(out_dir, progress=True, **kwargs):
        calls["data"].append((Path(out_dir).parent.name, kwargs))
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "events.json").write_text("{}\n")

    def stage(name, script, words, nproc, logs):
        calls["stages"].append((Path(logs).parent.name, script, list(words)))
        return 2.5

    def evaluate(pred, data, out_dir=None, progress=True):
        groups = groups_of(Path(pred).parent.name)
        return {"classes": ["a", "b"], "chance_accuracy": groups["VT2A"]["chance_accuracy"], "groups": groups}, ""

    monkeypatch.setattr(lb, "make_dataset", make)
    monkeypatch.setattr(lb, "run_stage", stage)
    monkeypatch.setattr(lb, "evaluate", evaluate)
    # the stub events.json holds no clips to measure: the data's loudness is pinned here
    monkeypatch.setattr(lb, "loudness_overrides",
                        lambda target, root: ["output.loudness_norm=true", "output.loudness_target_lufs=-14.00"])
    return calls


def _robust_groups(name: str) -> dict:
    """seed1 meets every target; dur2s is late on V2A onsets; the 4-class set names T2A rows badly."""
    rows = {"VT2A": 12, "T2A": 12, "V2A": 12}
    acc = {"VT2A": 0.9, "T2A": 0.75, "V2A": 0.8}
    onsets = {"VT2A": 30.0, "V2A": 60.0, "T2A": 500.0}  # T2A timing is not judged
    if name == "dur2s":
        onsets["V2A"] = 80.0
    if name == "classes4_heldout_words":
        acc["T2A"] = 0.5
    groups = _groups(acc, onsets, 50.0, rows)  # Fréchet ratio 50: not judged here (null target)
    if name == "classes4_heldout_words":
        for mode in rows:
            groups[mode]["chance_accuracy"] = 0.25
    return groups


def _words(words: list[str]) -> dict[str, str]:
    return {w.split("=", 1)[0]: w.split("=", 1)[1].strip("'") for w in words}


def test_robustness_variations_make_their_data_sets_and_forward_their_shapes(monkeypatch, tmp_path: Path):
    """Each variation's make_dataset keywords, and the model and data shapes that reach every
    launcher of it: the demo's tiny_16k, and for 2 s clips 16 CLIP frames / 40 Synchformer tokens."""
    from collections import Counter

    from wavflow.config import load_config
    from wavflow.demo import learning_benchmark as lb
    from wavflow.demo.make_dataset import CLASS_NAMES, _plan_clips

    shipped = load_config(REPO / "configs/bench_learning.yaml", job="bench_learning")
    assert list(shipped.bench.stages) == ["memorise", "generalise", "robustness", "finetune"]
    cfg = load_config(REPO / "configs/bench_learning.yaml", [f"bench.out_dir={tmp_path}", "bench.stages=[robustness]"],
                      job="bench_learning")
    calls = _fake_pipeline(monkeypatch, _robust_groups)
    lb.run_benchmark(cfg)
    common = {"dataset": "shapes", "n": 144, "seed": 0, "duration": 1.0, "sample_rate": 16000, "holdout_frac": 0.25,
              "no_caption_frac": pytest.approx(1 / 3, abs=1e-3), "no_video_frac": pytest.approx(1 / 3, abs=1e-3)}
    made = dict(calls["data"])
    assert list(made) == ["seed1", "dur2s", "classes4_heldout_words"]
    assert made["seed1"] == {**common, "seed": 1}
    assert made["dur2s"] == {**common, "duration": 2.0}
    assert made["classes4_heldout_words"] == {**common, "classes": ["low_tone", "chirp", "noise_burst", "clicks"],
                                              "caption_split": "heldout", "palette_seed": 3}
    for kwargs in made.values():  # the shipped sizes give every mode at least 12 held-out rows
        split, _, modes = _plan_clips(kwargs["n"], kwargs["seed"], kwargs["holdout_frac"], kwargs["no_caption_frac"],
                                      kwargs["no_video_frac"], kwargs.get("classes", CLASS_NAMES))
        held = Counter(m for s, m in zip(split, modes) if s == "holdout")
        assert min(held[m] for m in ("VT2A", "T2A", "V2A")) >= 12, held

    scripts = ["extract_vt2a", "extract_t2a", "train", "predict"]
    for name in made:
        mine = [(script, _words(words)) for var, script, words in calls["stages"] if var == name]
        assert [script for script, _ in mine] == scripts
        shape = ("2.0", "16", "40") if name == "dur2s" else ("1.0", "8", "16")
        for script, w in mine:
            assert w["model.name"] == "tiny_16k", (name, script)
            assert (w["data.audio_duration"], w["data.clip_seq_len"], w["data.sync_seq_len"]) == shape, (name, script)
        assert mine[0][1]["extraction.duration_sec"] == shape[0]
        train, predict = mine[2][1], mine[3][1]
        recipe = ("training.max_steps", "training.lr", "training.batch_size", "training.warmup_steps",
                  "sampling.mean", "sampling.scale", "training.precision")
        b = cfg.bench  # the configured recipe reaches the launcher (configs/bench_learning.yaml)
        assert [train[k] for k in recipe] == [str(v) for v in (b.robustness.max_steps, b.lr, b.batch_size,
                                                               b.warmup_steps, b.time_mean, b.time_scale, b.precision)]
        assert train["training.max_steps"] != "None" and float(train["sampling.mean"]) < 0
        assert train["training.output_dir"] == str(tmp_path / "robustness" / name / "train")
        assert (predict["inference.cfg"], predict["model.use_ema"]) == ("1.5", "true")
        assert predict["data.csv_path"] == str(tmp_path / "robustness" / name / "data" / "holdout_infer.csv")
    assert cfg.model.name == "small_16k" and cfg.data.audio_duration == 1.0  # the other stages keep theirs


def test_the_instruments_config_runs_every_stage_on_the_instruments_set(monkeypatch, tmp_path: Path):
    """configs/bench_learning_instruments.yaml: bench_learning.yaml's recipe on the recorded
    instruments, its class subset made of instrument names (checked before anything runs)."""
    from wavflow.config import load_config
    from wavflow.demo import learning_benchmark as lb
    from wavflow.demo.instruments import INSTRUMENT_NAMES
    from wavflow.errors import WavFlowError

    shapes = load_config(REPO / "configs/bench_learning.yaml", job="bench_learning")
    cfg = load_config(REPO / "configs/bench_learning_instruments.yaml",
                      [f"bench.out_dir={tmp_path}", "bench.stages=[robustness]"], job="bench_learning")
    assert shapes.bench.dataset == "shapes" and cfg.bench.dataset == "instruments"
    for key in ("lr", "time_mean", "time_scale", "batch_size", "eval_cfg"):
        assert cfg.bench[key] == shapes.bench[key], key
    calls = _fake_pipeline(monkeypatch, _robust_groups)
    lb.run_benchmark(cfg)
    made = dict(calls["data"])
    assert list(made) == ["seed1", "dur2s", "classes4_heldout_words"]
    assert all(kwargs["dataset"] == "instruments" for kwargs in made.values())
    assert set(made["classes4_heldout_words"]["classes"]) <= set(INSTRUMENT_NAMES)
    # a shapes class in an instruments variation fails before anything is made or trained
    calls["data"].clear()
    bad = load_config(REPO / "configs/bench_learning_instruments.yaml",
                      [f"bench.out_dir={tmp_path / 'bad'}", "bench.stages=[robustness]",
                       "bench.robustness.variations=[{name:a,classes:[piano,chirp]}]"], job="bench_learning")
    with pytest.raises(WavFlowError, match=r"variations\[0\] \(a\): .*unknown class 'chirp' of the instruments set"):
        lb.run_benchmark(bad)
    assert calls["data"] == []


def test_robustness_judges_every_mode_of_every_variation_and_resumes(monkeypatch, tmp_path: Path, capsys,
                                                                      caplog):
    from wavflow.demo import learning_benchmark as lb

    calls = _fake_pipeline(monkeypatch, _robust_groups)
    argv = [f"bench.out_dir={tmp_path}", "bench.stages=[robustness]"]
    assert lb.main(argv) == 0
    printed = capsys.readouterr().out
    assert "robustness: targets met in 1 of 3 variations" in printed
    assert [ln.split()[:2] + ln.split()[-1:] for ln in printed.splitlines() if "MISSED" in ln] == \
        [["dur2s", "V2A", "MISSED"], ["classes4_heldout_words", "T2A", "MISSED"]]

    stage = json.loads((tmp_path / "metrics.json").read_text())["stages"]["robustness"]
    configured = OmegaConf.load(REPO / "configs/bench_learning.yaml").bench.robustness.max_steps
    assert stage["model"] == "tiny_16k" and stage["max_steps"] == configured
    assert stage["train_seconds"] == 3 * 2.5  # the training calls only
    assert stage["variations_met"] == 1 and stage["target_reached"] is False
    variations = stage["variations"]
    assert list(variations) == ["seed1", "dur2s", "classes4_heldout_words"]
    for name, v in variations.items():
        assert set(v["modes"]) == {"VT2A", "T2A", "V2A"}
        for m in v["modes"].values():
            assert set(m) == {"n", "chance", "class_accuracy", "onset_median_ms", "target_met"} and m["n"] == 12
        assert v["model"] == "tiny_16k" and "sample_rate" not in v["dataset"]
        saved = json.loads((tmp_path / "robustness" / name / "metrics.json").read_text())
        assert saved["groups"]["overall"]["frechet_ratio"] == 50.0  # null target: not judged
        assert set(saved["targets"]) == set(v["targets"]) == {"class_acc.VT2A", "class_acc.T2A", "class_acc.V2A",
                                                              "onset_ms.VT2A", "onset_ms.V2A"}
    assert variations["seed1"]["target_met"] and all(m["target_met"] for m in variations["seed1"]["modes"].values())
    dur = variations["dur2s"]
    assert not dur["target_met"] and [k for k, ok in dur["targets"].items() if not ok] == ["onset_ms.V2A"]
    assert {k: m["target_met"] for k, m in dur["modes"].items()} == {"VT2A": True, "T2A": True, "V2A": False}
    assert dur["modes"]["V2A"]["onset_median_ms"] == 80.0 and dur["dataset"]["duration"] == 2.0
    four = variations["classes4_heldout_words"]
    assert {k: m["target_met"] for k, m in four["modes"].items()} == {"VT2A": True, "T2A": False, "V2A": True}
    assert four["modes"]["T2A"] == {"n": 12, "chance": 0.25, "class_accuracy": 0.5, "onset_median_ms": 500.0,
                                    "target_met": False}

    # a second run makes, trains and scores nothing: every variation has its metrics.json
    calls["data"].clear(), calls["stages"].clear()
    assert lb.main(argv) == 0
    assert calls == {"data": [], "stages": []}
    again = json.loads((tmp_path / "metrics.json").read_text())["stages"]["robustness"]["variations"]
    assert {k: {**v, "wall_seconds": 0} for k, v in again.items()} == \
        {k: {**v, "wall_seconds": 0} for k, v in variations.items()}
    # ... but judges the saved figures by today's targets
    assert lb.main(argv + ["bench.targets.robustness.onset_ms.V2A=100.0"]) == 0 and calls["stages"] == []
    rejudged = json.loads((tmp_path / "metrics.json").read_text())["stages"]["robustness"]["variations"]
    assert rejudged["dur2s"]["target_met"] and not rejudged["classes4_heldout_words"]["target_met"]

    # an unfinished variation runs again (its data set is reused), the finished ones do not
    (tmp_path / "robustness" / "dur2s" / "metrics.json").unlink()
    assert lb.main(argv) == 0
    assert calls["data"] == [] and {var for var, _, _ in calls["stages"]} == {"dur2s"} and len(calls["stages"]) == 4

    # a folder made with other settings is neither resumed nor reported
    calls["stages"].clear()
    capsys.readouterr()
    assert lb.main(argv + ["bench.robustness.max_steps=700"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("[wavflow.bench_learning] error: ")
    assert "seed1 holds a robustness run made with other settings (max_steps)" in last
    assert calls["stages"] == []


@pytest.mark.parametrize("variations, message", [
    ("[{name:a,seed:1},{name:a,seed:2}]", r"variations\[1\]: needs a name of its own"),
    ("[{name:'../up',seed:1}]", r"variations\[0\]: needs a name"),
    ("[{name:a,fps:10}]", r"variations\[0\] \(a\): unknown keys \['fps'\]"),
    ("[{name:a,classes:[low_tone,kazoo]}]", r"variations\[0\] \(a\): .*unknown class 'kazoo'"),
    ("[{name:a,caption_split:unseen}]", r"variations\[0\] \(a\): caption_split must be one of"),
    ("[{name:a,duration:0.5}]", r"variations\[0\] \(a\): .*duration must be >= 1.0"),
    ("[]", r"variations is empty"),
])
def test_a_bad_robustness_variation_stops_the_benchmark_before_anything_runs(monkeypatch, tmp_path: Path,
                                                                               variations: str, message: str):
    from wavflow.config import load_config
    from wavflow.demo import learning_benchmark as lb
    from wavflow.errors import WavFlowError

    calls = _fake_pipeline(monkeypatch, _robust_groups)
    cfg = load_config(REPO / "configs/bench_learning.yaml", [
        f"bench.out_dir={tmp_path}", "bench.stages=[memorise,robustness]",
        f"bench.robustness.variations={variations}"], job="bench_learning")
    with pytest.raises(WavFlowError, match=message):
        lb.run_benchmark(cfg)
    assert calls == {"data": [], "stages": []}  # not even the memorise stage ran


def test_sampling_quality_reports_each_mode_never_pooled():
    """scripts/bench/sampling_quality.py reads the per-mode metrics groups: class accuracy with
    its rows for VT2A, T2A and V2A, onset median for the modes with video."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("sampling_quality", REPO / "scripts/bench/sampling_quality.py")
    sq = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sq)
    groups = _groups({"VT2A": 0.9, "T2A": 0.5, "V2A": 0.75}, {"VT2A": 12.0, "T2A": 400.0, "V2A": 30.0}, 2.0,
                     rows={"VT2A": 34, "T2A": 7, "V2A": 8})
    groups["overall"]["frechet"] = 123.0
    head = sq.headline({"groups": groups})
    assert head == {"modes": {"VT2A": {"n": 34, "class_accuracy": 0.9, "onset_median_ms": 12.0},
                              "T2A": {"n": 7, "class_accuracy": 0.5},
                              "V2A": {"n": 8, "class_accuracy": 0.75, "onset_median_ms": 30.0}},
                    "frechet": 123.0}
    table = sq.format_table({"settings": {"reference@cfg1": head, "euler12@cfg1": {**head, "max_abs_diff": 0.01,
                                                                                    "mean_abs_diff": 0.001}}})
    header, ref, fast = table.splitlines()
    assert header.split()[:7] == ["setting", "VT2A", "acc", "(n)", "T2A", "acc", "(n)"]
    assert ref.split()[1:10] == ["0.900", "34", "0.500", "7", "0.750", "8", "12.0", "30.0", "123"]
    assert fast.split()[-2:] == ["0.01", "0.001"] and "400" not in table  # T2A timing is not reported
