"""Does it learn? The memorise and generalise stages of the learning benchmark.

    python -m wavflow.demo.learning_benchmark [--config PATH] [key=value ...]

An interrupted run resumes: run the same command again. Both stages use the real pipeline (launchers for extraction, training and prediction). Training
runs in chunks of `eval_every` steps through `training.max_steps` and resumes bit-exactly from
`checkpoint_latest.pth`, so the curve costs no extra training. Each evaluation predicts with the
latest weights and scores the audio; results go to `<out_dir>/<stage>/curve.json`, a PNG curve,
and `<out_dir>/metrics.json` with the git revision and wall times.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from wavflow.config import format_override
from wavflow.demo.pipeline import REPO_ROOT, run_stage, shared_overrides
from wavflow.errors import WavFlowError
from wavflow.io_utils import atomic_write_csv, atomic_write_text

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


def _extract(cfg: DictConfig, mode: str, in_csv: Path, data_root: Path, out: Path, logs: Path) -> Path:
    out_csv = out / f"train_{mode}_features.csv"
    run_stage(f"extract_{mode}", f"extract_{mode}.sh", shared_overrides(cfg) + [
        f"data.csv_path={in_csv}", f"data.data_root={data_root}", f"output.pth_dir={out / mode}",
        f"output.csv_path={out_csv}", f"extraction.duration_sec={cfg.data.audio_duration}",
        "extraction.num_workers=0"], int(cfg.bench.nproc), logs)
    return out_csv


def _train_to(cfg: DictConfig, stage_cfg: DictConfig, train_csvs: list[Path], out: Path, step: int,
              logs: Path) -> float:
    b = cfg.bench
    return run_stage(f"train_to_{step}", "train_single_node.sh", shared_overrides(cfg) + [
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


def _predict(cfg: DictConfig, stage: str, csv_path: Path, data_root: Path, ckpt: Path, out: Path, logs: Path,
             tag: str, use_ema: bool = False, extra: Sequence[str] = ()) -> float:
    """Predict `csv_path` as the benchmark evaluates; `extra` key=value words replace the
    benchmark's own value of the same key (e.g. sampling.num_steps=12) or add to them."""
    words = shared_overrides(cfg) + [
        f"data.csv_path={csv_path}", f"data.data_root={data_root}", f"model.ckpt_path={ckpt}",
        f"model.use_ema={str(use_ema).lower()}", f"inference.cfg={stage_eval_cfg(cfg, stage)}",
        f"sampling.num_steps={cfg.sampling.num_steps}", f"output.output_dir={out}",
        "output.mux_video=false", "output.overwrite=true", "output.loudness_norm=true",
        "inference.batch_size=8"]
    replaced = {w.split("=", 1)[0] for w in extra}
    words = [w for w in words if w.split("=", 1)[0] not in replaced] + list(extra)
    return run_stage(f"predict_{tag}", "predict.sh", words, 1, logs)


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
def run_memorise(cfg: DictConfig, root: Path) -> dict[str, Any]:
    """4 clips with 4 distinct classes and captions, learned by heart."""
    from wavflow.demo.make_dataset import make_dataset
    from wavflow.demo.metrics import nearest_reference, noise_baseline

    st = cfg.bench.memorise
    logs = root / "logs"
    data = root / "data"
    info = make_dataset(data, n=12, seed=int(cfg.bench.seed), duration=float(cfg.data.audio_duration),
                        sample_rate=int(cfg.data.target_sample_rate), no_caption_frac=0.0, no_video_frac=0.0,
                        progress=False)
    chosen, labels = [], set()
    for clip in info.clips:  # the first four clips of distinct classes
        if clip.label not in labels:
            chosen.append(clip)
            labels.add(clip.label)
        if len(chosen) == 4:
            break
    ids = [c.id for c in chosen]
    atomic_write_csv(pd.DataFrame({"id": ids, "audio_path": [c.audio_path for c in chosen],
                                   "video_path": [c.video_path for c in chosen],
                                   "caption": [c.description for c in chosen]}), data / "memorise_vt2a.csv")
    eval_rows = []
    for c in chosen:  # same conditioning as training (video + caption), and caption only
        eval_rows.append({"id": f"{c.id}__vt2a", "video_path": c.video_path, "caption": c.description,
                          "video_exist": 1, "text_exist": 1})
        eval_rows.append({"id": f"{c.id}__t2a", "video_path": "", "caption": c.description,
                          "video_exist": 0, "text_exist": 1})
    atomic_write_csv(pd.DataFrame(eval_rows), data / "memorise_eval.csv")
    feats = _extract(cfg, "vt2a", data / "memorise_vt2a.csv", data, root / "features", logs)

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
        train_s += _train_to(cfg, st, [feats], root / "train", step, logs)
        for use_ema in (False, True):
            pred = root / "predict" / (f"step_{step:06d}" + ("_ema" if use_ema else ""))
            _predict(cfg, "memorise", data / "memorise_eval.csv", data, ckpt, pred, logs, f"memorise_{step}",
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
def run_generalise(cfg: DictConfig, root: Path) -> dict[str, Any]:
    """Procedural set with held-out clips: class accuracy from text, onset timing from video."""
    from wavflow.demo.make_dataset import make_dataset
    from wavflow.demo.metrics import evaluate

    st = cfg.bench.generalise
    logs = root / "logs"
    data = root / "data"
    make_dataset(data, n=int(st.n), seed=int(cfg.bench.seed), duration=float(cfg.data.audio_duration),
                 sample_rate=int(cfg.data.target_sample_rate), holdout_frac=float(st.holdout_frac), progress=False)
    csvs = [_extract(cfg, m, data / f"train_{m}.csv", data, root / "features", logs) for m in ("vt2a", "t2a")]
    targets = cfg.bench.targets
    curve, train_s, wall_before = _resume_curve(root)
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
        train_s += _train_to(cfg, st, csvs, root / "train", step, logs)
        pred = root / "predict" / f"step_{step:06d}"
        _predict(cfg, "generalise", data / "holdout_infer.csv", data, root / "train" / "run" / "checkpoint_latest.pth",
                 pred, logs, f"generalise_{step}", use_ema=True)
        metrics, _ = evaluate(pred, data, out_dir=pred, progress=False)
        text, video = metrics["groups"]["text_conditioned"], metrics["groups"]["video_conditioned"]
        # onset median over every reference onset, a missed one counting 1000 ms (demo/metrics.py)
        point = {"step": step, "train_seconds": round(train_s, 1), "wall_seconds": round(time.time() - start, 1),
                 "text_class_accuracy": text["class_accuracy"], "text_rows": text["n"],
                 "video_onset_median_ms": video["onset_median_ms"], "video_rows": video["n"],
                 "video_reference_onsets": video["num_reference_onsets"],
                 "video_onset_detection_rate": video["onset_detection_rate"],
                 "groups": metrics["groups"]}
        point["target_met"] = bool(point["text_class_accuracy"] >= float(targets.generalise_class_acc)
                                   and point["video_onset_median_ms"] is not None
                                   and point["video_onset_median_ms"] <= float(targets.generalise_onset_ms))
        curve.append(point)
        log.info("generalise step %d (train %.0f s): text-conditioned class acc %.3f (n=%d), video-conditioned "
                 "onset median %s ms (n=%d rows, %d onsets)", step, train_s, point["text_class_accuracy"],
                 text["n"], point["video_onset_median_ms"], video["n"], video["num_reference_onsets"])
        _write_curve(root, curve, "generalise", [("text_class_accuracy", None), ("video_onset_median_ms", None),
                                                 ("video_onset_detection_rate", None)])
        if point["target_met"]:
            reached = point
            break
    return {"n": int(st.n), "curve": curve, "target_reached": reached is not None, "target_first_met": reached,
            "train_seconds": round(train_s, 1), "chance_accuracy": 1 / 6}


def _write_curve(root: Path, curve: list[dict], title: str, series: Sequence[tuple[str, str | None]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
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
        "cfg": {stage: stage_eval_cfg(cfg, stage) for stage in ("memorise", "generalise")},
        "train_extra": [str(w) for w in cfg.bench.train_extra]}, "stages": {}}
    runners = {"memorise": run_memorise, "generalise": run_generalise}
    for stage in cfg.bench.stages:
        if stage not in runners:
            raise WavFlowError(f"bench.stages: unknown stage {stage!r} (memorise | generalise)")
        start = time.time()
        result["stages"][stage] = runners[stage](cfg, out / stage)
        result["stages"][stage]["wall_seconds"] = round(time.time() - start, 1)
        atomic_write_text(out / "metrics.json", json.dumps(result, indent=1) + "\n")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s %(levelname)s] %(message)s")
    from wavflow.config import load_config, parse_cli

    try:
        path, overrides = parse_cli(list(sys.argv[1:] if argv is None else argv), "bench_learning.yaml")
        result = run_benchmark(load_config(path, overrides, job="bench_learning"))
    except WavFlowError as exc:
        log.error("%s: %s", type(exc).__name__, exc)
        return 2
    for name, stage in result["stages"].items():
        first = stage["target_first_met"]
        print(f"{name}: target {'reached at step ' + str(first['step']) if first else 'NOT reached'} "
              f"(train {stage['train_seconds']} s, wall {stage['wall_seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
