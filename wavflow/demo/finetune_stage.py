"""The learning benchmark's finetune stage: adapt a trained model to a sound class it never heard,
from a few clips, and measure what it learns and what it forgets (TRAINING.md "Fine-tuning").

1. One procedural data set of every class (bench.finetune.n clips, holdout_frac of them held
   out; the shipped sizes give each class 18 training and 12 held-out clips).
2. Pre-train the demo's recipe on the training rows of every class but `new_class`.
3. From its checkpoint (EMA weights), fine-tune on `clips` training clips of the new class
   (plus `replay_clips` clips of the old classes when set), once per way in `ways`: full
   fine-tuning, the last block only (`training.trainable`), LoRA (merged with
   `python -m wavflow.train.lora_merge` before prediction).
4. Every model, the pre-trained one included, generates every evaluation clip in all three
   modes (VT2A: video and caption; T2A: the caption; V2A: the video): the new class's held-out
   clips and `old_eval_clips_per_class` held-out clips of each old class. Each mode is scored on
   its own with the demo's metrics (class accuracy against every class of the set, onsets).

Per way: the new class's accuracy and onset median per mode, the old classes' accuracy before
and after and its ratio (forgetting), trainable parameters, training time, step time and peak
memory (from the run's training.log). A finished way (its result.json) is judged again by the
current targets, not run again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import statistics
import sys
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from wavflow.audio import load_audio
from wavflow.config import format_override
from wavflow.demo import learning_benchmark as lb
from wavflow.demo.make_dataset import ClipInfo, DatasetInfo, load_dataset_info, MODES
from wavflow.demo.metrics import evaluate_waves, fit_reference, ReferenceModel
from wavflow.demo.pipeline import run_command, shared_overrides
from wavflow.errors import ConfigError
from wavflow.io_utils import atomic_write_csv, atomic_write_text
from wavflow.model.presets import PRESETS

log = logging.getLogger("wavflow.bench")
WAYS_HELP = "bench.finetune.ways: {name: [key=value, ...]} (full: [], last block: training.trainable, LoRA: training.lora.rank)"
# the per-mode figures a way's result keeps of the metrics' groups
KEPT = ("n", "chance_accuracy", "class_accuracy", "onset_median_ms", "onset_detection_rate", "level_diff_db",
        "noise_floor_diff_db")


@dataclasses.dataclass
class FinetuneSplit:
    """Which clips pre-train, fine-tune and evaluate."""

    new_class: str
    finetune_ids: list[str]  # training clips of the new class
    replay_ids: list[str]  # training clips of the old classes fine-tuned beside them
    new_eval: list[ClipInfo]  # held-out clips of the new class
    old_eval: list[ClipInfo]  # held-out clips of the old classes


def plan_split(info: DatasetInfo, new_class: str, clips: int, replay_clips: int,
               old_eval_per_class: int) -> FinetuneSplit:
    """The fine-tuning clips (the first `clips` training clips of `new_class` by id), the replay
    clips (old classes in turn) and the evaluation clips; too few clips is a ConfigError."""
    if new_class not in info.classes:
        raise ConfigError(f"bench.finetune.new_class: {new_class!r} is not a class of the data set ({info.classes})")
    train = sorted(info.split("train"), key=lambda c: c.id)
    held = sorted(info.split("holdout"), key=lambda c: c.id)
    new_train = [c.id for c in train if c.label == new_class]
    if len(new_train) < clips:
        raise ConfigError(f"bench.finetune.clips={clips}, but the data set has {len(new_train)} training clips of "
                          f"{new_class!r}: raise bench.finetune.n or lower clips")
    old_classes = [k for k in info.classes if k != new_class]
    by_class = {k: [c.id for c in train if c.label == k] for k in old_classes}
    replay = [ids[i] for i in range(max((len(v) for v in by_class.values()), default=0))
              for ids in by_class.values() if i < len(ids)][:replay_clips]
    if len(replay) < replay_clips:
        raise ConfigError(f"bench.finetune.replay_clips={replay_clips}, but the old classes have {len(replay)} "
                          "training clips")
    old_eval = [c for k in old_classes for c in [c for c in held if c.label == k][:old_eval_per_class]]
    new_eval = [c for c in held if c.label == new_class]
    if not new_eval or not old_eval:
        raise ConfigError("bench.finetune: the data set holds out no clips of the new class or of the old ones: "
                          "raise bench.finetune.n or holdout_frac")
    return FinetuneSplit(new_class, new_train[:clips], replay, new_eval, old_eval)


def eval_rows(clips: list[ClipInfo]) -> pd.DataFrame:
    """Every clip in all three modes: `<id>__<mode>` with the clip's video and/or its caption."""
    rows = []
    for c in clips:
        for mode in MODES:
            video, text = mode != "T2A", mode != "V2A"
            rows.append({"id": f"{c.id}__{mode.lower()}", "video_path": c.video_path if video else "",
                         "caption": c.description if text else "", "video_exist": int(video),
                         "text_exist": int(text)})
    return pd.DataFrame(rows)


def subset_features(csv: Path, ids: set[str], out: Path) -> Path | None:
    """The rows of an extraction's features CSV whose id is in `ids` (None when there are none)."""
    table = pd.read_csv(csv, dtype={"id": str}, keep_default_na=False)
    rows = table[table["id"].isin(ids)]
    if rows.empty:
        return None
    atomic_write_csv(rows, out)
    return out


def score_modes(pred: Path, ref: ReferenceModel, clips: list[ClipInfo]) -> dict[str, dict[str, Any]]:
    """Each mode's figures over `clips` as generated in that mode (`<pred>/<id>__<mode>.wav`)."""
    out: dict[str, dict[str, Any]] = {}
    sr = ref.sample_rate
    for mode in MODES:
        as_mode = [dataclasses.replace(c, mode=mode) for c in clips]
        mine = dataclasses.replace(ref, info=dataclasses.replace(ref.info, clips=as_mode))
        waves = {c.id: load_audio(pred / f"{c.id}__{mode.lower()}.wav", sr).numpy() for c in clips}
        groups = evaluate_waves(waves, mine)["groups"]
        out[mode] = {k: groups[mode].get(k) for k in KEPT}
    return out


def train_log_figures(log_path: Path, batch_size: int) -> dict[str, Any]:
    """Trainable parameters, median step time (from the throughput lines after the first) and
    peak memory, as the run's training.log states them."""
    text = log_path.read_text() if log_path.is_file() else ""
    found: dict[str, Any] = {"trainable_params": None, "total_params": None, "step_seconds": None, "peak_mb": None}
    # peak memory and training state (weights, gradients, AdamW, EMAs) of rank 0
    m = re.findall(r"Number of trainable parameters: ([\d.]+)M of ([\d.]+)M", text)
    if m:
        found["trainable_params"], found["total_params"] = (round(float(v) * 1e6) for v in m[-1])
    rates = [float(v) for v in re.findall(r"Throughput: ([\d.]+) samples/s", text)]
    if rates:
        found["step_seconds"] = round(batch_size / statistics.median(rates[1:] or rates), 4)
    peaks = re.findall(r"Peak memory: (\d+) MB", text)
    if peaks:
        found["peak_mb"] = int(peaks[-1])
    state = re.findall(r"training state ([\d.]+) MB", text)
    found["state_mb"] = float(state[-1]) if state else None
    return found


def way_words(st: DictConfig, way: str, preset: str) -> list[str]:
    """A way's key=value words, `{last_fused_block}` replaced by the preset's last block index."""
    words = st.ways.get(way)
    if words is None or isinstance(words, str):
        raise ConfigError(f"{WAYS_HELP}; {way!r} is not a list")
    last = PRESETS[preset].fused_depth - 1
    return [str(w).replace("{last_fused_block}", str(last)) for w in words]


def selected_ways(st: DictConfig) -> list[str]:
    """bench.finetune.only_ways (null: every way of bench.finetune.ways, in order)."""
    names = [str(w) for w in st.ways]
    only = st.get("only_ways")
    if only is None:
        return names
    unknown = [str(w) for w in only if str(w) not in names]
    if unknown:
        raise ConfigError(f"bench.finetune.only_ways: {unknown} are not ways of bench.finetune.ways ({names})")
    return [str(w) for w in only]


def _recipe_words(cfg: DictConfig, batch_size: int, lr: float, warmup: int) -> list[str]:
    b = cfg.bench
    return [f"training.batch_size={batch_size}", f"training.lr={lr}", f"training.warmup_steps={warmup}",
            f"training.precision={b.precision}", f"sampling.mean={b.time_mean}", f"sampling.scale={b.time_scale}",
            "training.ema_warmup=true", "training.log_freq=25", "training.gen_train_freq=0",
            "training.checkpoint_freq=0", "training.checkpoint_save_epoch=0", "training.ema_checkpoint_save_epoch=0",
            f"training.seed={b.seed}", "training.epochs=1000000"]


def _finetune(cfg: DictConfig, way: str, csvs: list[Path], base: Path, out: Path, logs: Path) -> tuple[Path, float]:
    """Fine-tune one way from `base`; the checkpoint prediction loads (LoRA: merged) and the
    training seconds."""
    st = cfg.bench.finetune
    words = shared_overrides(cfg) + [
        format_override("data.train_csv", [str(p) for p in csvs]), f"training.output_dir={out}",
        f"training.experiment_id={way}", f"training.max_steps={st.steps}",
        *_recipe_words(cfg, int(st.batch_size), float(st.lr), int(st.warmup_steps)),
        format_override("training.init_from", str(base)), "training.init_from_ema=true",
        *[str(w) for w in cfg.bench.train_extra]]
    words = lb.replace_words(words, way_words(st, way, str(cfg.model.name)))  # a way's own lr wins
    seconds = lb.run_stage(f"finetune_{way}", "train", words, int(cfg.bench.nproc), logs)
    run = out / way
    adapter = run / "adapter_checkpoint_latest.pth"
    if not adapter.is_file():
        return run / "checkpoint_latest.pth", seconds
    merged = run / "merged_checkpoint_latest.pth"
    run_command(f"lora_merge_{way}", [sys.executable, "-m", "wavflow.train.lora_merge", "--adapter", str(adapter),
                                      "--out", str(merged)], logs)
    return merged, seconds


def _evaluate(cfg: DictConfig, root: Path, tag: str, ckpt: Path, data: Path, ref: ReferenceModel,
              split: FinetuneSplit, logs: Path) -> dict[str, Any]:
    pred = root / "predict" / tag
    lb.predict_stage(cfg, "finetune", data / "finetune_eval.csv", data, ckpt, pred, logs, f"finetune_{tag}",
                     use_ema=True)
    return {"new": score_modes(pred, ref, split.new_eval), "old": score_modes(pred, ref, split.old_eval)}


def judge_way(result: dict[str, Any], before: dict[str, Any], targets: Any) -> dict[str, Any]:
    """The way's targets: the new class's accuracy >= new_class_acc and onset median <=
    new_onset_ms per mode named, the old classes' accuracy >= old_keep x before in every mode,
    and training within max_train_minutes."""
    met: dict[str, bool] = {}
    keep: dict[str, float | None] = {}
    for mode in MODES:
        was, now = before["old"][mode]["class_accuracy"], result["old"][mode]["class_accuracy"]
        keep[mode] = None if not was or now is None else round(now / was, 4)
    where = "bench.targets.finetune"
    for mode, least in lb.mode_targets(targets, "new_class_acc", where).items():
        value = result["new"][mode]["class_accuracy"]
        met[f"new_class_acc.{mode}"] = value is not None and value >= least
    for mode, most in lb.mode_targets(targets, "new_onset_ms", where).items():
        value = result["new"][mode]["onset_median_ms"]  # a missed onset counts 1000 ms
        met[f"new_onset_ms.{mode}"] = value is not None and value <= most
    if targets.get("old_keep") is not None:
        for mode in MODES:
            met[f"old_keep.{mode}"] = keep[mode] is not None and keep[mode] >= float(targets.old_keep)
    if targets.get("max_train_minutes") is not None:
        met["train_minutes"] = result["train_seconds"] <= 60.0 * float(targets.max_train_minutes)
    return {"old_keep": keep, "targets": met, "target_met": bool(met) and all(met.values())}


def _finetune_cfg(cfg: DictConfig) -> DictConfig:
    """The benchmark config with the stage's model (bench.finetune.model; null: model.name)."""
    out = cfg.copy()
    model = OmegaConf.select(cfg, "bench.finetune.model")
    if model is not None and model not in PRESETS:
        raise ConfigError(f"bench.finetune.model: {model!r} is not a preset ({', '.join(sorted(PRESETS))})")
    out.model.name = str(model or cfg.model.name)
    return out


def settings(cfg: DictConfig) -> dict[str, Any]:
    """What the stage's data, pre-training and the pre-trained model's scores are made with (a
    folder of other settings is refused)."""
    b, st = cfg.bench, cfg.bench.finetune
    keys = ("n", "holdout_frac", "no_caption_frac", "no_video_frac", "new_class", "pretrain_steps",
            "old_eval_clips_per_class", "eval_cfg")
    return {"model": str(cfg.model.name), "dataset": str(b.dataset), "seed": int(b.seed),
            "duration": float(cfg.data.audio_duration), **{k: OmegaConf.select(st, k) for k in keys},
            **{k: b[k] for k in ("lr", "warmup_steps", "time_mean", "time_scale", "batch_size", "precision")},
            "sampling_steps": int(cfg.sampling.num_steps)}


def way_settings(cfg: DictConfig, way: str) -> dict[str, Any]:
    st = cfg.bench.finetune
    keys = ("clips", "replay_clips", "steps", "lr", "warmup_steps", "batch_size", "eval_cfg", "old_eval_clips_per_class")
    return {**{k: OmegaConf.select(st, k) for k in keys}, "words": way_words(st, way, str(cfg.model.name)),
            "train_extra": [str(w) for w in cfg.bench.train_extra], "sampling_steps": int(cfg.sampling.num_steps)}


def run_finetune(cfg: DictConfig, root: Path) -> dict[str, Any]:
    """Pre-train without the new class, fine-tune each way on its clips, score every model per mode."""
    cfg = _finetune_cfg(cfg)
    st, targets = cfg.bench.finetune, cfg.bench.targets.finetune
    logs, data = root / "logs", root / "data"
    lb.check_run_folder(root, settings(cfg), "finetune")
    if not (data / "events.json").is_file():  # written last by make_dataset
        lb.make_dataset(data, n=int(st.n), seed=int(cfg.bench.seed), duration=float(cfg.data.audio_duration),
                        sample_rate=int(cfg.data.target_sample_rate), holdout_frac=float(st.holdout_frac),
                        no_caption_frac=float(st.no_caption_frac), no_video_frac=float(st.no_video_frac),
                        progress=False, dataset=str(cfg.bench.dataset))
    info = load_dataset_info(data)
    split = plan_split(info, str(st.new_class), int(st.clips), int(st.replay_clips), int(st.old_eval_clips_per_class))
    atomic_write_csv(eval_rows(split.new_eval + split.old_eval), data / "finetune_eval.csv")
    extracted = [lb.extract_features(cfg, m, data / f"train_{m}.csv", data, root / "features", logs) for m in ("vt2a", "t2a")]
    old_ids = {c.id for c in info.split("train") if c.label != split.new_class}
    tune_ids = set(split.finetune_ids) | set(split.replay_ids)
    pre_csvs = [p for m, f in zip(("vt2a", "t2a"), extracted)
                if (p := subset_features(f, old_ids, root / "features" / f"pretrain_{m}.csv"))]
    tune_csvs = [p for m, f in zip(("vt2a", "t2a"), extracted)
                 if (p := subset_features(f, tune_ids, root / "features" / f"finetune_{m}.csv"))]
    base = root / "pretrain" / "run" / "checkpoint_latest.pth"
    ref = fit_reference(info)
    before_path = root / "pretrain" / "result.json"
    if before_path.is_file():  # trained and scored by an earlier run of the stage
        before = json.loads(before_path.read_text())
    else:
        seconds = lb.train_to(cfg, OmegaConf.create({"repeat_factor": 1}), pre_csvs, root / "pretrain",
                              int(st.pretrain_steps), logs)
        before = {**_evaluate(cfg, root, "pretrained", base, data, ref, split, logs), "train_seconds": round(seconds, 1)}
        atomic_write_text(before_path, json.dumps(before, indent=1) + "\n")
    ways: dict[str, Any] = {}
    for way in selected_ways(st):
        folder = root / "ways" / way
        lb.check_run_folder(folder, way_settings(cfg, way), f"finetune way {way}")
        done = folder / "result.json"
        if done.is_file():
            result = json.loads(done.read_text())
        else:
            ckpt, seconds = _finetune(cfg, way, tune_csvs, base, folder, logs)
            result = {**_evaluate(cfg, root, way, ckpt, data, ref, split, logs), "train_seconds": round(seconds, 1),
                      **train_log_figures(folder / way / "training.log", int(st.batch_size))}
            atomic_write_text(done, json.dumps(result, indent=1) + "\n")
        ways[way] = {**result, **judge_way(result, before, targets)}
    log.info("finetune:\n%s", finetune_table(before, ways, split.new_class))
    return {"model": str(cfg.model.name), "new_class": split.new_class, "classes": list(info.classes),
            "finetune_clips": split.finetune_ids, "replay_clips": split.replay_ids,
            "eval_clips": {"new": len(split.new_eval), "old": len(split.old_eval)},
            "pretrain_seconds": before["train_seconds"], "before": before, "ways": ways,
            "target_reached": any(w["target_met"] for w in ways.values()),
            "train_seconds": round(before["train_seconds"] + sum(w["train_seconds"] for w in ways.values()), 1),
            "targets": OmegaConf.to_container(targets, resolve=True)}


def finetune_table(before: dict[str, Any], ways: dict[str, Any], new_class: str) -> str:
    """One line per model and mode: the new class's accuracy and onset median, the old classes'
    accuracy (and kept share after fine-tuning), trainable parameters, step time, peak memory."""
    def cell(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    lines = [f"{'model':<14}{'mode':<6}{'n new/old':>10}{'chance':>8}{new_class + ' acc':>14}{'onset ms':>10}"
             f"{'old acc':>9}{'kept':>7}{'trainable':>11}{'step s':>8}{'peak MB':>9}{'train s':>9}  target"]
    rows = [("pre-trained", before, None)] + [(name, w, w) for name, w in ways.items()]
    for name, r, w in rows:
        for mode in MODES:
            new, old = r["new"][mode], r["old"][mode]
            own = [met for key, met in (w or {}).get("targets", {}).items() if key.rpartition(".")[2] == mode]
            verdict = "-" if w is None or not own else ("met" if all(own) else "MISSED")
            lines.append(
                f"{name:<14}{mode:<6}{str(new['n']) + '/' + str(old['n']):>10}{cell(new['chance_accuracy'], '.3f'):>8}"
                f"{cell(new['class_accuracy'], '.3f'):>14}{cell(new['onset_median_ms'], '.1f'):>10}"
                f"{cell(old['class_accuracy'], '.3f'):>9}{cell((w or {}).get('old_keep', {}).get(mode), '.2f'):>7}"
                f"{cell((w or {}).get('trainable_params'), ',d'):>11}{cell((w or {}).get('step_seconds'), '.3f'):>8}"
                f"{cell((w or {}).get('peak_mb'), 'd'):>9}{cell((w or {}).get('train_seconds'), '.0f'):>9}  {verdict}")
    return "\n".join(lines)
