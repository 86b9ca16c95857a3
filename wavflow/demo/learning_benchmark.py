"""Does it learn? The memorise, generalise and robustness stages of the learning benchmark.

    python -m wavflow.demo.learning_benchmark [--config PATH] [key=value ...]

An interrupted run resumes: run the same command again. All stages use the real pipeline
(launchers for extraction, training and prediction). Memorise and generalise train in chunks of
`eval_every` steps through `training.max_steps` and resume bit-exactly from
`checkpoint_latest.pth`, so the curve costs no extra training. Each evaluation predicts with the
latest weights and scores the audio; results go to `<out_dir>/<stage>/curve.json`, a PNG curve,
and `<out_dir>/metrics.json` with the git revision and wall times.

Robustness trains the demo's recipe (bench.robustness.model, tiny_16k: the demo's network; the
shared recipe keys bench.lr, warmup_steps, time_mean/scale, batch_size, precision) once per
variation of the data set (bench.robustness.variations: make_dataset keywords such as another
seed, clip duration, class subset, held-out caption wordings or palette), predicts its held-out
rows and judges each mode on its own rows against bench.targets.robustness. Each variation
writes `<out_dir>/robustness/<name>/metrics.json` when finished; a finished variation is not
run again, only judged again by the current targets.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from wavflow.config import format_override, load_config, parse_cli
from wavflow.demo.make_dataset import CAPTION_SPLITS, check_args, check_classes, DATASETS, make_dataset, MODES
from wavflow.demo.metrics import evaluate, nearest_reference, noise_baseline
from wavflow.demo.pipeline import loudness_overrides, REPO_ROOT, run_stage, shared_overrides
from wavflow.errors import ConfigError, WavFlowError
from wavflow.exit_codes import EXIT_OK, run_job
from wavflow.io_utils import atomic_write_csv, atomic_write_text
from wavflow.model.presets import PRESETS
from wavflow.shapes import video_seq_lens

log = logging.getLogger("wavflow.bench")
# Memorisation distances compare sound events: log-mels relative to their peak, floored 30 dB
# below it, so loudness normalisation and the -40 dB background texture do not count.
EVENT_RANGE_DB = 30.0


def _git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:
        return "unknown"


def extract_features(cfg: DictConfig, mode: str, in_csv: Path, data_root: Path, out: Path, logs: Path) -> Path:
    out_csv = out / f"train_{mode}_features.csv"
    run_stage(f"extract_{mode}", f"extract_{mode}", shared_overrides(cfg) + [
        f"data.csv_path={in_csv}", f"data.data_root={data_root}", f"output.pth_dir={out / mode}",
        f"output.csv_path={out_csv}", f"extraction.duration_sec={cfg.data.audio_duration}",
        "extraction.num_workers=0"], int(cfg.bench.nproc), logs)
    return out_csv


def train_to(cfg: DictConfig, stage_cfg: DictConfig, train_csvs: list[Path], out: Path, step: int,
              logs: Path) -> float:
    b = cfg.bench
    return run_stage(f"train_to_{step}", "train", shared_overrides(cfg) + [
        format_override("data.train_csv", [str(p) for p in train_csvs]),
        f"training.output_dir={out}", "training.experiment_id=run",
        f"training.max_steps={step}", "training.epochs=1000000",
        f"training.batch_size={b.batch_size}", f"training.lr={b.lr}",
        f"training.warmup_steps={b.warmup_steps}", f"training.precision={b.precision}",
        f"sampling.mean={b.time_mean}", f"sampling.scale={b.time_scale}",
        f"training.repeat_factor={stage_cfg.repeat_factor}", "training.ema_warmup=true",
        "training.log_freq=50", "training.gen_train_freq=0", "training.checkpoint_freq=0",
        "training.checkpoint_save_epoch=0", "training.ema_checkpoint_save_epoch=0",
        f"training.seed={b.seed}", *[str(w) for w in b.train_extra]], int(b.nproc), logs)


def stage_eval_cfg(cfg: DictConfig, stage: str) -> float:
    """The guidance a stage is evaluated with: bench.<stage>.eval_cfg, else bench.eval_cfg."""
    own = OmegaConf.select(cfg, f"bench.{stage}.eval_cfg")
    return float(cfg.bench.eval_cfg if own is None else own)


def predict_stage(cfg: DictConfig, stage: str, csv_path: Path, data_root: Path, ckpt: Path, out: Path, logs: Path,
             tag: str, use_ema: bool = False, extra: Sequence[str] = ()) -> float:
    """Predict `csv_path` as the benchmark evaluates; `extra` key=value words replace the
    benchmark's own value of the same key (e.g. sampling.num_steps=12) or add to them."""
    words = shared_overrides(cfg) + [
        f"data.csv_path={csv_path}", f"data.data_root={data_root}", f"model.ckpt_path={ckpt}",
        f"model.use_ema={str(use_ema).lower()}", f"inference.cfg={stage_eval_cfg(cfg, stage)}",
        f"sampling.num_steps={cfg.sampling.num_steps}", f"output.output_dir={out}",
        "output.mux_video=false", "output.overwrite=true", "inference.batch_size=8",
        # at the loudness the model predicts, else the data's median, as the demo writes them (level figures compare)
        *(loudness_overrides(benchmark_loudness(cfg), data_root) if (data_root / "events.json").is_file()
          else ["output.loudness_norm=true"])]
    return run_stage(f"predict_{tag}", "predict", replace_words(words, extra), 1, logs)


def benchmark_loudness(cfg: DictConfig) -> str:
    """`model` when the benchmark's networks carry the loudness head (model.level_head), else `data`."""
    return "model" if bool(OmegaConf.select(cfg, "model.level_head", default=False)) else "data"


def replace_words(words: Sequence[str], extra: Sequence[str]) -> list[str]:
    """`words` + `extra`, a key set in `extra` replacing its value in `words` (one value per key)."""
    replaced = {w.split("=", 1)[0] for w in extra}
    return [w for w in words if w.split("=", 1)[0] not in replaced] + list(extra)


def _resume_curve(root: Path) -> tuple[list[dict], float, float]:
    """The evaluations an interrupted run of this stage already made (training resumes from
    checkpoint_latest.pth, so the next chunk continues where the curve stops)."""
    path = root / "curve.json"
    if not path.is_file():
        return [], 0.0, 0.0
    curve = json.loads(path.read_text())
    if curve:
        log.info("resuming %s after step %d (curve.json)", root.name, curve[-1]["step"])
        return curve, float(curve[-1]["train_seconds"]), float(curve[-1]["wall_seconds"])
    return [], 0.0, 0.0


# ------------------------------------------------------------------------------ memorise
def _memorise_clips(cfg: DictConfig, data: Path) -> list[Any]:
    """The first four clips of distinct classes of a 12-clip set, their training CSV (VT2A) and
    their evaluation CSV (each clip with video + caption, as trained, and caption only)."""
    info = make_dataset(data, n=12, seed=int(cfg.bench.seed), duration=float(cfg.data.audio_duration),
                        sample_rate=int(cfg.data.target_sample_rate), no_caption_frac=0.0, no_video_frac=0.0,
                        progress=False, dataset=str(cfg.bench.dataset))
    chosen, labels = [], set()
    for clip in info.clips:
        if clip.label not in labels:
            chosen.append(clip)
            labels.add(clip.label)
        if len(chosen) == 4:
            break
    atomic_write_csv(pd.DataFrame({"id": [c.id for c in chosen], "audio_path": [c.audio_path for c in chosen],
                                   "video_path": [c.video_path for c in chosen],
                                   "caption": [c.description for c in chosen]}), data / "memorise_vt2a.csv")
    eval_rows = []
    for c in chosen:
        eval_rows.append({"id": f"{c.id}__vt2a", "video_path": c.video_path, "caption": c.description,
                          "video_exist": 1, "text_exist": 1})
        eval_rows.append({"id": f"{c.id}__t2a", "video_path": "", "caption": c.description,
                          "video_exist": 0, "text_exist": 1})
    atomic_write_csv(pd.DataFrame(eval_rows), data / "memorise_eval.csv")
    return chosen


def run_memorise(cfg: DictConfig, root: Path) -> dict[str, Any]:
    """4 clips with 4 distinct classes and captions, learned by heart."""
    st = cfg.bench.memorise
    logs = root / "logs"
    data = root / "data"
    chosen = _memorise_clips(cfg, data)
    ids = [c.id for c in chosen]
    feats = extract_features(cfg, "vt2a", data / "memorise_vt2a.csv", data, root / "features", logs)

    ref_wavs = [data / c.audio_path for c in chosen]
    sr = int(cfg.data.target_sample_rate)
    noise = noise_baseline(4, float(cfg.data.audio_duration), sr, seed=1)
    ckpt = root / "train" / "run" / "checkpoint_latest.pth"
    target_ratio = float(cfg.bench.targets.memorise_ratio)

    def score(step: int) -> dict[str, Any]:
        """Nearest-reference scores of the saved predictions of `step` (live and EMA weights)."""
        point: dict[str, Any] = {"step": step}
        for weights in ("live", "ema"):
            pred = root / "predict" / (f"step_{step:06d}" + ("_ema" if weights == "ema" else ""))
            if not (pred / "summary.csv").is_file():
                continue  # evaluations made before EMA weights were scored too
            for mode in ("vt2a", "t2a"):
                gens = [pred / f"{i}__{mode}.wav" for i in ids]
                d = nearest_reference(gens, ref_wavs, sample_rate=sr, dynamic_range_db=EVENT_RANGE_DB)
                d_noise = nearest_reference(list(noise), ref_wavs, sample_rate=sr, dynamic_range_db=EVENT_RANGE_DB)
                own, base = float(np.mean(np.diag(d))), float(np.mean(np.diag(d_noise)))
                point[f"{weights}_{mode}"] = {
                    "nearest_is_own": float(np.mean(d.argmin(1) == np.arange(len(ids)))),
                    "own_distance_db": own, "noise_distance_db": base, "ratio_to_noise": own / base,
                    "matrix": d.round(3).tolist()}
        best = point.get("ema_vt2a", point.get("live_vt2a"))
        point["target_met"] = bool(best["nearest_is_own"] == 1.0 and best["ratio_to_noise"] < target_ratio)
        return point

    curve, train_s, wall_before = _resume_curve(root)
    start = time.time() - wall_before
    curve = [{**score(p["step"]), "train_seconds": p["train_seconds"], "wall_seconds": p["wall_seconds"]}
             for p in curve]  # re-scored from the saved wavs, so a metric change reaches old points
    done = curve[-1]["step"] if curve else 0
    for step in range(int(st.eval_every), int(st.max_steps) + 1, int(st.eval_every)):
        if len(curve) >= 2 and curve[-1]["target_met"] and curve[-2]["target_met"]:
            break  # met twice in a row: stable
        if step <= done:
            continue
        train_s += train_to(cfg, st, [feats], root / "train", step, logs)
        for use_ema in (False, True):
            pred = root / "predict" / (f"step_{step:06d}" + ("_ema" if use_ema else ""))
            predict_stage(cfg, "memorise", data / "memorise_eval.csv", data, ckpt, pred, logs, f"memorise_{step}",
                     use_ema=use_ema)
        point = {**score(step), "train_seconds": round(train_s, 1), "wall_seconds": round(time.time() - start, 1)}
        curve.append(point)
        log.info("memorise step %d: %s", step, {k: {m: point[k][m] for m in ("nearest_is_own", "ratio_to_noise")}
                                               for k in point if k.startswith(("live_", "ema_"))})
        _write_curve(root, curve, "memorise", [("live_vt2a", "nearest_is_own"), ("ema_vt2a", "nearest_is_own"),
                                               ("live_vt2a", "ratio_to_noise"), ("ema_t2a", "nearest_is_own")])
    first = None
    for point in curve:  # the first point of the final streak of met targets
        first = (first or point) if point["target_met"] else None
    return {"clips": ids, "captions": [c.description for c in chosen], "event_range_db": EVENT_RANGE_DB,
            "curve": curve, "target_reached": first is not None, "target_first_met": first,
            "train_seconds": round(train_s, 1)}


# ------------------------------------------------------------------------------ generalise
def mode_targets(targets: Any, metric: str, where: str = "bench.targets.generalise") -> dict[str, float]:
    """`targets.<metric>` as {mode: threshold}; a mode the metrics do not know is a config error
    (`where`: the config key of `targets`, for the message)."""
    per_mode = {str(k): float(v) for k, v in (targets.get(metric) or {}).items()}
    unknown = sorted(set(per_mode) - set(MODES))
    if unknown:
        raise ConfigError(f"{where}.{metric}: unknown modes {unknown} (one of {list(MODES)})")
    return per_mode


def judge_generalise(groups: dict[str, Any], targets: Any) -> dict[str, Any]:
    """The generalise stage's judgement: `judge_modes` against bench.targets.generalise."""
    return judge_modes(groups, targets, "bench.targets.generalise")


def judge_modes(groups: dict[str, Any], targets: Any, where: str) -> dict[str, Any]:
    """Each mode's figures and its own targets (class_acc >=, onset_ms <=); the Fréchet ratio (all
    rows / real-vs-real) <= frechet_ratio unless that is null. A mode without rows or figures
    fails: every mode must learn. `where`: the config key of `targets`, for error messages."""
    point: dict[str, Any] = {
        "class_accuracy": {m: groups.get(m, {}).get("class_accuracy") for m in MODES},
        "onset_median_ms": {m: groups.get(m, {}).get("onset_median_ms") for m in MODES},
        "onset_detection_rate": {m: groups.get(m, {}).get("onset_detection_rate") for m in MODES},
        "reference_onsets": {m: groups.get(m, {}).get("num_reference_onsets") for m in MODES},
        "rows": {m: groups.get(m, {}).get("n", 0) for m in MODES},
        "frechet_ratio": groups.get("overall", {}).get("frechet_ratio"),
        "level_diff_db": {m: groups.get(m, {}).get("level_diff_db") for m in MODES},
        "noise_floor_diff_db": {m: groups.get(m, {}).get("noise_floor_diff_db") for m in MODES}}
    met: dict[str, bool] = {}
    for mode, least in mode_targets(targets, "class_acc", where).items():
        value = point["class_accuracy"][mode]
        met[f"class_acc.{mode}"] = value is not None and value >= least
    for mode, most in mode_targets(targets, "onset_ms", where).items():
        value = point["onset_median_ms"][mode]  # a missed onset counts 1000 ms (demo/metrics.py)
        met[f"onset_ms.{mode}"] = value is not None and value <= most
    if targets.get("frechet_ratio") is not None:
        value = point["frechet_ratio"]
        met["frechet_ratio"] = value is not None and value <= float(targets.frechet_ratio)
    return {**point, "targets": met, "target_met": bool(met) and all(met.values())}


def generalise_series(targets: Any) -> list[tuple[str, str | None]]:
    """The curve's panels: one per mode of each per-mode target, then the Fréchet ratio."""
    return [("class_accuracy", m) for m in mode_targets(targets, "class_acc")] + \
        [("onset_median_ms", m) for m in mode_targets(targets, "onset_ms")] + [("frechet_ratio", None)]


def run_generalise(cfg: DictConfig, root: Path) -> dict[str, Any]:
    """Procedural set with held-out clips: class accuracy and onset timing of each mode on its own rows."""
    st = cfg.bench.generalise
    logs = root / "logs"
    data = root / "data"
    info = make_dataset(data, n=int(st.n), seed=int(cfg.bench.seed), duration=float(cfg.data.audio_duration),
                        sample_rate=int(cfg.data.target_sample_rate), holdout_frac=float(st.holdout_frac),
                        no_caption_frac=float(st.no_caption_frac), no_video_frac=float(st.no_video_frac),
                        progress=False, dataset=str(cfg.bench.dataset))
    csvs = [extract_features(cfg, m, data / f"train_{m}.csv", data, root / "features", logs) for m in ("vt2a", "t2a")]
    targets = cfg.bench.targets
    curve, train_s, wall_before = _resume_curve(root)
    # points of an interrupted run are judged again by today's targets (from their saved groups)
    curve = [{**p, **judge_generalise(p.get("groups", {}), targets.generalise)} for p in curve]
    start = time.time() - wall_before
    reached = next((p for p in curve if p["target_met"]), None)
    done = curve[-1]["step"] if curve else 0
    budget_s = 60.0 * float(st.max_train_minutes)
    for step in range(int(st.eval_every), int(st.max_steps) + 1, int(st.eval_every)):
        if step <= done or reached is not None:
            continue
        if train_s >= budget_s:
            log.info("generalise: training budget of %s min spent (%.0f s) before step %d", st.max_train_minutes,
                     train_s, step)
            break
        train_s += train_to(cfg, st, csvs, root / "train", step, logs)
        pred = root / "predict" / f"step_{step:06d}"
        predict_stage(cfg, "generalise", data / "holdout_infer.csv", data, root / "train" / "run" / "checkpoint_latest.pth",
                 pred, logs, f"generalise_{step}", use_ema=True)
        metrics, _ = evaluate(pred, data, out_dir=pred, progress=False)
        point = {"step": step, "train_seconds": round(train_s, 1), "wall_seconds": round(time.time() - start, 1),
                 **judge_generalise(metrics["groups"], targets.generalise), "groups": metrics["groups"]}
        curve.append(point)
        log.info("generalise step %d (train %.0f s): class acc %s, onset median ms %s, Fréchet ratio %s, rows %s; "
                 "targets %s", step, train_s, point["class_accuracy"], point["onset_median_ms"],
                 point["frechet_ratio"], point["rows"], point["targets"])
        _write_curve(root, curve, "generalise", generalise_series(targets.generalise))
        if point["target_met"]:
            reached = point
            break
    return {"n": int(st.n), "curve": curve, "target_reached": reached is not None, "target_first_met": reached,
            "train_seconds": round(train_s, 1), "chance_accuracy": 1 / len(info.classes),
            "targets": OmegaConf.to_container(targets.generalise, resolve=True)}


# ------------------------------------------------------------------------------ robustness
# make_dataset keywords a variation may set (sample_rate and fps stay the config's: the encoders'
# and the model's rates); every other key of a variation but `name` is a config error
VARIATION_KEYS = ("dataset", "n", "seed", "duration", "holdout_frac", "no_caption_frac", "no_video_frac",
                  "classes", "caption_split", "palette_seed")
# the config keys a variation may change; shared_overrides forwards them to every launcher
VARIATION_CFG_KEYS = ("model.name", "data.audio_duration", "data.clip_seq_len", "data.sync_seq_len")


@dataclass
class RobustnessVariation:
    """One run of the robustness stage: its data set (make_dataset keywords) and its config."""

    name: str
    dataset: dict[str, Any]
    cfg: DictConfig  # the benchmark config with this variation's model and data shapes

    def settings(self) -> dict[str, Any]:
        """What the variation's data, training and evaluation are made with (resume check)."""
        b = self.cfg.bench
        recipe = ("seed", "lr", "warmup_steps", "time_mean", "time_scale", "batch_size", "precision")
        return {"dataset": self.dataset, **{k: OmegaConf.select(self.cfg, k) for k in VARIATION_CFG_KEYS},
                "max_steps": int(b.robustness.max_steps), "repeat_factor": int(b.robustness.repeat_factor),
                **{k: b[k] for k in recipe}, "train_extra": [str(w) for w in b.train_extra],
                "eval_cfg": stage_eval_cfg(self.cfg, "robustness"), "sampling_steps": int(self.cfg.sampling.num_steps)}


def _variation_cfg(cfg: DictConfig, duration: float) -> DictConfig:
    """`cfg` with the robustness model and, for another clip duration, the data shapes it gives."""
    out = copy.deepcopy(cfg)
    model = OmegaConf.select(cfg, "bench.robustness.model")
    out.model.name = str(model or cfg.model.name)
    if duration != float(cfg.data.audio_duration):
        clip_len, sync_len = video_seq_lens(duration)
        out.data.audio_duration, out.data.clip_seq_len, out.data.sync_seq_len = duration, clip_len, sync_len
    return out


def robustness_variations(cfg: DictConfig) -> list[RobustnessVariation]:
    """bench.robustness.variations, checked before anything trains."""
    rb, where = cfg.bench.robustness, "bench.robustness.variations"
    defaults = {"dataset": str(cfg.bench.dataset), "n": int(rb.n), "seed": int(cfg.bench.seed), "duration": float(cfg.data.audio_duration),
                "sample_rate": int(cfg.data.target_sample_rate), "holdout_frac": float(rb.holdout_frac),
                "no_caption_frac": float(rb.no_caption_frac), "no_video_frac": float(rb.no_video_frac)}
    if rb.model is not None and rb.model not in PRESETS:
        raise ConfigError(f"bench.robustness.model: {rb.model!r} is not a preset ({', '.join(sorted(PRESETS))})")
    out: list[RobustnessVariation] = []
    for i, item in enumerate(rb.variations):
        spec = dict(OmegaConf.to_container(item, resolve=True) if isinstance(item, DictConfig) else item)
        name = str(spec.pop("name", "") or "")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) or name in {v.name for v in out}:
            raise ConfigError(f"{where}[{i}]: needs a name of its own made of letters, digits, '_', '-', '.' "
                               f"(a folder name), got {name!r}")
        unknown = sorted(set(spec) - set(VARIATION_KEYS))
        if unknown:
            raise ConfigError(f"{where}[{i}] ({name}): unknown keys {unknown} (make_dataset keywords: "
                               f"{', '.join(VARIATION_KEYS)})")
        dataset = {**defaults, **spec, "duration": float(spec.get("duration", defaults["duration"]))}
        try:
            _check_variation_dataset(dataset)
        except WavFlowError as exc:
            raise ConfigError(f"{where}[{i}] ({name}): {exc}") from None
        out.append(RobustnessVariation(name, dataset, _variation_cfg(cfg, dataset["duration"])))
    if not out:
        raise ConfigError(f"{where} is empty: list the variations, or leave robustness out of bench.stages")
    return out


def _check_variation_dataset(dataset: dict[str, Any]) -> None:
    """make_dataset's own checks of a variation's keywords (fps and frame size: its defaults);
    `classes` becomes a plain list."""
    check_args(int(dataset["n"]), dataset["duration"], int(dataset["sample_rate"]), 25, 96,
                float(dataset["holdout_frac"]), float(dataset["no_caption_frac"]), float(dataset["no_video_frac"]))
    if dataset["dataset"] not in DATASETS:
        raise ConfigError(f"dataset must be one of {list(DATASETS)}, got {dataset['dataset']!r}")
    if dataset.get("classes") is not None:
        dataset["classes"] = check_classes(dataset["classes"], dataset["dataset"])
    if dataset.get("caption_split", "shared") not in CAPTION_SPLITS:
        raise ConfigError(f"caption_split must be one of {list(CAPTION_SPLITS)}, got {dataset['caption_split']!r}")


def check_run_folder(root: Path, settings: dict[str, Any], what: str, remedy: str = "delete that folder") -> None:
    """Refuse to resume or report a folder of `what` (e.g. "robustness") made with other settings;
    a new folder records them in settings.json."""
    path = root / "settings.json"
    if path.is_file():
        have = json.loads(path.read_text())
        want = json.loads(json.dumps(settings))  # as JSON reads it back (tuples as lists)
        diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
        if diff:
            raise ConfigError(f"{root} holds a {what} run made with other settings ({', '.join(diff)}): {remedy}")
    else:
        atomic_write_text(path, json.dumps(settings, indent=1) + "\n")


def run_robustness_variation(var: RobustnessVariation, root: Path, targets: Any) -> dict[str, Any]:
    """Make the variation's data set, extract, train max_steps in one go, predict the held-out
    rows with EMA weights and score each mode; `<root>/metrics.json` marks it finished."""
    done = root / "metrics.json"
    check_run_folder(root, var.settings(), "robustness", "delete that folder or give the variation another name")
    if done.is_file():
        log.info("robustness %s: finished earlier (%s), judged again, not run again", var.name, done)
        return summarise_variation(json.loads(done.read_text()), targets)
    start = time.time()
    logs, data, cfg = root / "logs", root / "data", var.cfg
    if not (data / "events.json").is_file():  # written last by make_dataset
        make_dataset(data, progress=False, **var.dataset)
    csvs = [extract_features(cfg, m, data / f"train_{m}.csv", data, root / "features", logs) for m in ("vt2a", "t2a")]
    rb = cfg.bench.robustness
    train_s = train_to(cfg, rb, csvs, root / "train", int(rb.max_steps), logs)
    pred = root / "predict"
    predict_stage(cfg, "robustness", data / "holdout_infer.csv", data, root / "train" / "run" / "checkpoint_latest.pth",
             pred, logs, f"robustness_{var.name}", use_ema=True)
    metrics, _ = evaluate(pred, data, out_dir=pred, progress=False)
    saved = {"name": var.name, "settings": var.settings(), "evaluation": str(pred / "metrics.json"),
             "train_seconds": round(train_s, 1), "wall_seconds": round(time.time() - start, 1),
             "classes": metrics["classes"], "chance_accuracy": metrics["chance_accuracy"],
             **judge_modes(metrics["groups"], targets, "bench.targets.robustness"), "groups": metrics["groups"]}
    atomic_write_text(done, json.dumps(saved, indent=1) + "\n")
    return summarise_variation(saved, targets)


def summarise_variation(saved: dict[str, Any], targets: Any) -> dict[str, Any]:
    """A variation's line in the benchmark's metrics.json, judged by today's targets: per mode
    n, chance, class accuracy, onset median and whether all of that mode's targets are met."""
    judged = judge_modes(saved["groups"], targets, "bench.targets.robustness")
    modes: dict[str, Any] = {}
    for mode in MODES:
        group = saved["groups"].get(mode, {})
        own = [met for key, met in judged["targets"].items() if key.partition(".")[2] == mode]
        modes[mode] = {"n": group.get("n", 0), "chance": group.get("chance_accuracy"),
                       "class_accuracy": group.get("class_accuracy"), "onset_median_ms": group.get("onset_median_ms"),
                       "target_met": all(own) if own else None}  # None: no target for this mode
    dataset = {k: v for k, v in saved["settings"]["dataset"].items() if k != "sample_rate"}
    return {"dataset": dataset, "model": saved["settings"]["model.name"], "metrics": saved["evaluation"],
            "train_seconds": saved["train_seconds"], "wall_seconds": saved["wall_seconds"], "modes": modes,
            "targets": judged["targets"], "target_met": judged["target_met"]}


def run_robustness(cfg: DictConfig, root: Path) -> dict[str, Any]:
    """The demo's recipe on each variation of the data set, every mode judged on its own rows."""
    variations = robustness_variations(cfg)
    targets = cfg.bench.targets.robustness
    results = {var.name: run_robustness_variation(var, root / var.name, targets) for var in variations}
    log.info("robustness:\n%s", robustness_table(results))
    met = sum(r["target_met"] for r in results.values())
    return {"model": variations[0].cfg.model.name, "max_steps": int(cfg.bench.robustness.max_steps),
            "variations": results, "variations_met": met, "target_reached": met == len(results),
            "train_seconds": round(sum(r["train_seconds"] for r in results.values()), 1),
            "targets": OmegaConf.to_container(targets, resolve=True)}


def robustness_table(results: dict[str, Any]) -> str:
    """One line per variation and mode: rows, chance, class accuracy, onset median, targets met."""
    def cell(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    lines = [f"{'variation':<26}{'mode':<6}{'n':>4}{'chance':>8}{'class_acc':>11}{'onset_ms':>10}  target"]
    for name, r in results.items():
        for mode, m in r["modes"].items():
            verdict = {True: "met", False: "MISSED", None: "-"}[m["target_met"]]
            lines.append(f"{name:<26}{mode:<6}{m['n']:>4}{cell(m['chance'], '.3f'):>8}"
                         f"{cell(m['class_accuracy'], '.3f'):>11}{cell(m['onset_median_ms'], '.1f'):>10}  {verdict}")
    return "\n".join(lines)


def _write_curve(root: Path, curve: list[dict], title: str, series: Sequence[tuple[str, str | None]]) -> None:
    import matplotlib  # lazy: pyplot takes 0.6 s, only the curve figure needs it

    matplotlib.use("Agg")  # headless: no display on servers and CI
    # matplotlib.pyplot costs 0.6 s to import; only the curve figure needs it (today the
    # module-level import of wavflow.demo.pipeline -> figures loads it already)
    import matplotlib.pyplot as plt

    atomic_write_text(root / "curve.json", json.dumps(curve, indent=1) + "\n")
    fig, axes = plt.subplots(1, len(series), figsize=(4.2 * len(series), 3.2), squeeze=False)
    steps = [p["step"] for p in curve]
    for ax, (a, b) in zip(axes[0], series):
        values = [(p.get(a, {}).get(b) if b else p.get(a)) for p in curve]  # None: not measured then
        ax.plot(steps, [np.nan if v is None else v for v in values], marker="o")
        ax.set_title(f"{a}{'.' + b if b else ''}", fontsize=9)
        ax.set_xlabel("optimiser step")
        ax.grid(alpha=0.3)
    fig.suptitle(f"learning benchmark: {title}", fontsize=10)
    fig.tight_layout()
    fig.savefig(root / "curve.png", dpi=90)
    plt.close(fig)


def run_benchmark(cfg: DictConfig) -> dict[str, Any]:
    out = Path(cfg.bench.out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"git_revision": _git_revision(), "config": {
        "model": cfg.model.name, "duration": cfg.data.audio_duration, "precision": cfg.bench.precision,
        "batch_size": cfg.bench.batch_size, "lr": cfg.bench.lr, "sampling_steps": cfg.sampling.num_steps,
        "cfg": {stage: stage_eval_cfg(cfg, stage) for stage in ("memorise", "generalise", "robustness", "finetune")},
        "train_extra": [str(w) for w in cfg.bench.train_extra]}, "stages": {}}
    # a cycle: finetune_stage builds on this module's stage helpers
    from wavflow.demo.finetune_stage import run_finetune

    runners = {"memorise": run_memorise, "generalise": run_generalise, "robustness": run_robustness,
               "finetune": run_finetune}
    unknown = [stage for stage in cfg.bench.stages if stage not in runners]
    if unknown:  # before any stage runs
        raise ConfigError(f"bench.stages: unknown stage {unknown[0]!r} ({' | '.join(runners)})")
    if "robustness" in cfg.bench.stages:
        robustness_variations(cfg)  # a typo in a variation fails now, not after the other stages
    for stage in cfg.bench.stages:
        start = time.time()
        result["stages"][stage] = runners[stage](cfg, out / stage)
        result["stages"][stage]["wall_seconds"] = round(time.time() - start, 1)
        atomic_write_text(out / "metrics.json", json.dumps(result, indent=1) + "\n")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s %(levelname)s] %(message)s")
    return run_job("bench_learning", lambda: _bench(list(sys.argv[1:] if argv is None else argv)))


def _bench(argv: list[str]) -> int:
    path, overrides = parse_cli(argv, "bench_learning.yaml")
    result = run_benchmark(load_config(path, overrides, job="bench_learning"))
    for name, stage in result["stages"].items():
        print(stage_summary(name, stage))
    return EXIT_OK


def stage_summary(name: str, stage: dict[str, Any]) -> str:
    """The closing lines of a stage: whether its targets were reached (robustness: per variation
    and mode, as a table)."""
    times = f"(train {stage['train_seconds']} s, wall {stage['wall_seconds']} s)"
    if name == "robustness":
        return (f"robustness: targets met in {stage['variations_met']} of {len(stage['variations'])} variations "
                f"{times}\n{robustness_table(stage['variations'])}")
    if name == "finetune":
        from wavflow.demo.finetune_stage import finetune_table  # a cycle, as in run_benchmark

        met = [way for way, w in stage["ways"].items() if w["target_met"]]
        return (f"finetune: targets met by {', '.join(met) if met else 'no way'} {times}\n"
                f"{finetune_table(stage['before'], stage['ways'], stage['new_class'])}")
    first = stage["target_first_met"]
    return f"{name}: target {'reached at step ' + str(first['step']) if first else 'NOT reached'} {times}"


if __name__ == "__main__":
    sys.exit(main())
