"""The demo pipeline: the real launchers and modules, chained on the built-in data set.

Each stage runs the user-facing launcher script (`scripts/launch/*.sh`) as a subprocess with
config overrides, exactly as a user would. Stages whose outputs exist are reused unless
`demo.fresh=true`, so an interrupted demo resumes where it stopped.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig, OmegaConf

from wavflow.audio import integrated_loudness, load_audio
from wavflow.config import CONFIG_DIR, format_override
from wavflow.demo.figures import plot_real_vs_generated
from wavflow.demo.long_clip import LONG_ID, make_long_clip
from wavflow.demo.make_dataset import check_args, DATASETS, load_dataset_info, make_dataset
from wavflow.demo.metrics import evaluate
from wavflow.errors import AudioError, ConfigError, WavFlowError
from wavflow.io_utils import atomic_write_text

log = logging.getLogger("wavflow.demo")
REPO_ROOT = Path(__file__).resolve().parents[2]
# Keys every stage shares with the demo config.
# Keys of the demo / benchmark config forwarded to every launcher: the data shapes and encoders
# every stage must agree on, the feature normalisation the trainer applies (and records in the
# checkpoint), and the flow-matching settings of base.yaml that training and sampling share.
# A key a user sets on the command line must reach the stage that uses it, never be dropped.
SHARED_KEYS = (
    "model.name",
    "model.spectral_skip",
    "model.level_head",
    "data.target_sample_rate",
    "data.audio_duration",
    "data.clip_seq_len",
    "data.sync_seq_len",
    "data.text_seq_len",
    "data.feature_norm",
    "data.feature_norm_rms.clip_features",
    "data.feature_norm_rms.sync_features",
    "data.feature_norm_rms.text_features",
    "sampling.prediction_type",
    "sampling.min_sigma",
    "sampling.noise_scale",
    "sampling.noise_shift",
    "sampling.method",
    "encoders.profile",
    "encoders.cache_dir",
    "encoders.allow_download",
)


class StageError(WavFlowError):
    """A pipeline stage (a job run as a subprocess) failed; the demo exits with the stage's own
    exit code (docs/errors.md), so a usage error in a stage stays a usage error."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class DemoPaths:
    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def features(self) -> Path:
        return self.root / "features"

    @property
    def train(self) -> Path:
        return self.root / "train"

    @property
    def checkpoint(self) -> Path:
        return self.train / "demo" / "checkpoint_latest.pth"

    @property
    def predict(self) -> Path:
        return self.root / "predict"

    @property
    def predict_long(self) -> Path:
        return self.root / "predict_long"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics"

    @property
    def figure(self) -> Path:
        return self.root / "figure.png"


@dataclass
class DemoResult:
    paths: DemoPaths
    metrics: dict
    table: str
    timings: dict[str, float] = field(default_factory=dict)
    app_command: str = ""  # opens the demo's checkpoint in the web page


def shared_overrides(cfg: DictConfig) -> list[str]:
    out = []
    for key in SHARED_KEYS:
        out.append(format_override(key, OmegaConf.select(cfg, key)))  # exact: paths may hold ' #'
    return out


# The job behind each stage, run as its launcher in scripts/launch/ runs it (`python -m`, under
# the torchrun guard where the launcher uses torchrun) but without the shell: an installed
# package runs the demo and the learning benchmark without a checkout.
# job -> (module, config file in configs/, fixed words, under torchrun)
STAGE_JOBS: dict[str, tuple[str, str, tuple[str, ...], bool]] = {
    "extract_vt2a": ("wavflow.features.extract", "extract_vt2a.yaml", ("extraction.mode=vt2a",), True),
    "extract_t2a": ("wavflow.features.extract", "extract_t2a.yaml", ("extraction.mode=t2a",), True),
    "train": ("wavflow.train", "train.yaml", (), True),
    "predict": ("wavflow.predict", "infer.yaml", (), False),
}


def stage_command(job: str, overrides: Sequence[str], nproc: int) -> list[str]:
    """The command line of `job` (a STAGE_JOBS key) with `overrides`, on `nproc` processes."""
    module, config, fixed, distributed = STAGE_JOBS[job]
    launch = ["-m", "wavflow.torchrun_guard", "--standalone", f"--nproc_per_node={nproc}"] if distributed else []
    return [sys.executable, *launch, "-m", module, "--config", str(CONFIG_DIR / config), *fixed, *overrides]


def run_stage(name: str, job: str, overrides: Sequence[str], nproc: int, log_dir: Path) -> float:
    """Run `job` (a STAGE_JOBS key) with overrides; its output goes to the console and a log file."""
    return run_command(name, stage_command(job, overrides, nproc), log_dir, nproc)


def run_command(name: str, cmd: Sequence[str], log_dir: Path, nproc: int = 1) -> float:
    """Run a stage's command line; its output goes to the console and `<log_dir>/<name>.log`, a
    failure is a StageError with the command's exit code and its own last error line."""
    env = {k: v for k, v in os.environ.items() if k != "CONFIG_PATH"}  # --config names the job's own file
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, nproc))))
    package_root = str(Path(__file__).resolve().parents[2])  # wavflow importable by the stage's processes
    env["PYTHONPATH"] = package_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    print(f"\n=== [{name}] {' '.join(cmd)}", flush=True)
    start = time.time()
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        job_error = ""  # the job's own last line, `[wavflow.<job>] error: ...` (docs/errors.md)
        for line in proc.stdout:
            sys.stdout.write(line)
            log_file.write(line)
            if "] error: " in line and line.startswith("[wavflow."):
                job_error = line.strip()
        code = proc.wait()
    seconds = time.time() - start
    if code != 0:
        said = f": {job_error}" if job_error else ""
        raise StageError(f"stage '{name}' failed with exit code {code}{said} (full output in {log_path})", code)
    print(f"=== [{name}] done in {seconds:.1f}s", flush=True)
    return seconds


def _settings_stamp(cfg: DictConfig) -> dict:
    """What the reusable stages (data, features, training run) were made with."""
    keys = [*SHARED_KEYS, "demo.dataset", "demo.n", "demo.seed", "demo.holdout_frac", "demo.v2a_frac", "demo.t2a_frac",
            "demo.train.batch_size", "demo.train.lr", "demo.train.time_mean", "demo.train.time_scale"]
    return {k: OmegaConf.select(cfg, k) for k in keys}


def _check_reuse(cfg: DictConfig, root: Path) -> None:
    """Refuse to mix stages made with other settings into this run (a silent reuse would)."""
    stamp_path = root / "demo_settings.json"
    want = _settings_stamp(cfg)
    if stamp_path.is_file():
        have = json.loads(stamp_path.read_text())
        diff = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}
        if diff:
            listed = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
            raise ConfigError(
                f"{root} holds a demo made with other settings ({listed}). Re-run with demo.fresh=true "
                f"to start over there, or choose another demo.out_dir / DEMO_OUT."
            )
        print(f"=== reusing the finished stages in {root} (demo.fresh=true starts over)", flush=True)
    else:
        atomic_write_text(stamp_path, json.dumps(want, indent=1) + "\n")


# The demo keys behind each make_dataset argument (its checks name these, not its flags).
DATASET_KEYS = {"n": "demo.n", "duration": "data.audio_duration", "sample_rate": "data.target_sample_rate",
                "fps": "fps", "size": "size", "holdout_frac": "demo.holdout_frac",
                "no_caption_frac": "demo.v2a_frac", "no_video_frac": "demo.t2a_frac"}


def check_demo_config(cfg: DictConfig) -> None:
    """The demo's own keys, checked before anything is written (ConfigError naming the key): a
    bad value found later would leave demo_settings.json recording it, and the next run with
    the value fixed would refuse the folder."""
    d = cfg.demo
    if str(d.dataset) not in DATASETS:
        raise ConfigError(f"demo.dataset must be one of {', '.join(DATASETS)}, got {d.dataset!r}")
    check_args(int(d.n), float(cfg.data.audio_duration), int(cfg.data.target_sample_rate), 25, 96,
                float(d.holdout_frac), float(d.v2a_frac), float(d.t2a_frac), names=DATASET_KEYS)
    clips = OmegaConf.select(cfg, "demo.long_video_clips")
    if not isinstance(clips, int) or isinstance(clips, bool) or clips < 0:
        raise ConfigError(f"demo.long_video_clips must be an integer >= 0, got {clips!r}")
    for key in ("demo.nproc", "demo.train.max_steps", "demo.train.batch_size"):
        value = OmegaConf.select(cfg, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{key} must be an integer >= 1, got {value!r}")


def run_demo(cfg: DictConfig) -> DemoResult:
    """The whole demo, each stage resumable: data set, features, training, prediction on the
    held-out clips, metrics and figure (README, "The demo")."""
    check_demo_config(cfg)
    paths = DemoPaths(Path(cfg.demo.out_dir).absolute())
    if cfg.demo.fresh and paths.root.exists():
        shutil.rmtree(paths.root)
    paths.root.mkdir(parents=True, exist_ok=True)
    _check_reuse(cfg, paths.root)
    logs, nproc, shared = paths.root / "logs", int(cfg.demo.nproc), shared_overrides(cfg)
    timings: dict[str, float] = {}

    start = time.time()
    if not (paths.data / "events.json").is_file():
        print(f"=== [data] making {cfg.demo.n} {cfg.demo.dataset} clips in {paths.data}", flush=True)
        make_dataset(paths.data, n=int(cfg.demo.n), seed=int(cfg.demo.seed), duration=float(cfg.data.audio_duration),
                     sample_rate=int(cfg.data.target_sample_rate), holdout_frac=float(cfg.demo.holdout_frac),
                     no_caption_frac=float(cfg.demo.v2a_frac), no_video_frac=float(cfg.demo.t2a_frac),
                     dataset=str(cfg.demo.dataset))
    long_csv = paths.data / "long_infer.csv"
    if not long_csv.is_file():
        long_csv = make_long_clip(load_dataset_info(paths.data), int(cfg.demo.long_video_clips))  # None: too few
    timings["data"] = time.time() - start
    train_csvs = _extract_features(cfg, paths, shared, nproc, logs, timings)
    timings["train"] = run_stage("train", "train", _train_overrides(cfg, paths, shared, train_csvs),
                                 nproc, logs)
    timings["predict"] = run_stage("predict", "predict", _predict_overrides(cfg, paths, shared), 1, logs)
    if long_csv is not None:
        timings["predict_long"] = run_stage("predict_long", "predict",
                                            _predict_overrides(cfg, paths, shared, long_csv), 1, logs)

    start = time.time()
    metrics, table = evaluate(paths.predict, paths.data, out_dir=paths.metrics,
                              long_wav=paths.predict_long / f"{LONG_ID}.wav" if long_csv is not None else None,
                              window_sec=float(cfg.data.audio_duration))
    timings["metrics"] = time.time() - start
    plot_real_vs_generated(paths.data, paths.predict, paths.figure, max_clips=int(cfg.demo.figure_clips))
    atomic_write_text(paths.root / "timings.json", json.dumps(timings, indent=1) + "\n")
    return DemoResult(paths=paths, metrics=metrics, table=table, timings=timings, app_command=app_command(cfg, paths))


def app_command(cfg: DictConfig, paths: DemoPaths) -> str:
    """The command that opens the demo's checkpoint in the web page, sampling as the demo did."""
    words = [format_override("model.ckpt_path", str(paths.checkpoint)),
             format_override("model.use_ema", bool(cfg.demo.predict.use_ema)),
             format_override("inference.cfg", float(cfg.demo.predict.cfg)),
             format_override("sampling.num_steps", int(cfg.sampling.num_steps))]
    cache = OmegaConf.select(cfg, "encoders.cache_dir")
    if cache:  # where the demo's tiny encoders were written (else the default cache)
        words.append(format_override("encoders.cache_dir", cache))
    return "bash scripts/launch/app.sh " + " ".join(words)


def _extract_features(cfg: DictConfig, paths: DemoPaths, shared: list[str], nproc: int, logs: Path,
                      timings: dict[str, float]) -> list[Path]:
    """VT2A rows (with video) and T2A rows (caption only), each its own extraction; returns the
    training CSVs that have rows."""
    train_csvs = []
    for mode in ("vt2a", "t2a"):
        in_csv = paths.data / f"train_{mode}.csv"
        out_csv = paths.features / f"train_{mode}_features.csv"
        if not _has_rows(in_csv):
            continue
        train_csvs.append(out_csv)
        overrides = shared + [
            f"data.csv_path={in_csv}",
            f"data.data_root={paths.data}",
            f"output.pth_dir={paths.features / mode}",
            f"output.csv_path={out_csv}",
            f"extraction.duration_sec={cfg.data.audio_duration}",
            "extraction.num_workers=0",
        ]
        timings[f"extract_{mode}"] = run_stage(f"extract_{mode}", f"extract_{mode}", overrides, nproc, logs)
    return train_csvs


def _train_overrides(cfg: DictConfig, paths: DemoPaths, shared: list[str], train_csvs: list[Path]) -> list[str]:
    """The demo's training run (it resumes from checkpoint_latest.pth if an earlier demo stopped)."""
    t = cfg.demo.train
    return shared + [
        format_override("data.train_csv", [str(p) for p in train_csvs]),  # quoted: paths may hold ',' or ' #'
        f"training.output_dir={paths.train}",
        "training.experiment_id=demo",
        f"training.max_steps={t.max_steps}",
        "training.epochs=100000",
        f"training.batch_size={t.batch_size}",
        f"training.lr={t.lr}",
        f"training.warmup_steps={t.warmup_steps}",
        f"training.precision={t.precision}",
        f"sampling.mean={t.time_mean}",
        f"sampling.scale={t.time_scale}",
        "training.ema_warmup=true",
        "training.log_freq=20",
        "training.gen_train_freq=0",
        "training.checkpoint_freq=10",
        "training.checkpoint_save_epoch=0",
        "training.ema_checkpoint_save_epoch=0",
        "eval.num_steps=10",
    ]


def _predict_overrides(cfg: DictConfig, paths: DemoPaths, shared: list[str], csv: Path | None = None) -> list[str]:
    """Prediction on the held-out clips (VT2A, T2A and V2A rows) with mp4 muxing; with `csv`
    (the long video's row), into predict_long/ in windows (docs/long_form.md)."""
    out = paths.predict if csv is None else paths.predict_long
    return shared + [
        f"data.csv_path={csv or paths.data / 'holdout_infer.csv'}",
        f"data.data_root={paths.data}",
        f"model.ckpt_path={paths.checkpoint}",
        f"model.use_ema={str(bool(cfg.demo.predict.use_ema)).lower()}",
        f"inference.cfg={cfg.demo.predict.cfg}",
        f"sampling.num_steps={cfg.sampling.num_steps}",
        f"output.output_dir={out}",
        "output.mux_video=true",
        "output.overwrite=true",
        *loudness_overrides(cfg.demo.predict.loudness_target_lufs, paths.data),
    ]


@functools.lru_cache(maxsize=8)  # the benchmark predicts many times from one data set
def data_loudness_lufs(data_dir: Path, split: str = "train") -> float:
    """Median BS.1770 loudness of a built-in data set's clips of `split`. Training lifts every
    clip to one RMS (amplitude lifting), so a generated clip carries no level of its own: it is
    brought to the data's typical loudness to be compared with real clips."""
    info = load_dataset_info(data_dir)
    values = [integrated_loudness(load_audio(info.root / c.audio_path, info.sample_rate), info.sample_rate)
              for c in info.split(split)]
    finite = sorted(v for v in values if math.isfinite(v))
    if not finite:
        raise AudioError(f"no {split} clip of {info.events_path} has a measurable loudness")
    return float(finite[len(finite) // 2])


def loudness_overrides(target: object, data_dir: Path) -> list[str]:
    """Predict overrides for `demo.predict.loudness_target_lufs`: `model` (each clip at the
    loudness the network's loudness head predicts, docs/method.md §2.15), `data` (the training
    clips' median loudness), a number (LUFS), or null (no loudness normalisation)."""
    if target is None:
        return ["output.loudness_norm=false"]
    if str(target) == "model":
        return ["output.loudness_norm=true", "output.loudness_from_model=true"]
    if str(target) == "data":
        lufs = data_loudness_lufs(data_dir)
    else:
        try:
            lufs = float(target)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ConfigError(f"demo.predict.loudness_target_lufs must be 'model', 'data', a number (LUFS) or null, "
                              f"got {target!r}") from None
    return ["output.loudness_norm=true", f"output.loudness_target_lufs={lufs:.2f}"]


def _has_rows(csv_path: Path) -> bool:
    if not csv_path.is_file():
        return False
    with open(csv_path) as f:
        return sum(1 for line in f if line.strip()) > 1


def describe(result: DemoResult, steps: int) -> str:
    p = result.paths
    mp4s = sorted(p.predict.glob("*.mp4"))
    lines = [
        "",
        "WavFlow demo finished. Where everything is:",
        f"  data set (wav + mp4 + CSVs)  {p.data}",
        f"  cached features              {p.features}",
        f"  training run (checkpoints, training.log, tensorboard/)  {p.train / 'demo'}",
        f"  generated audio              {p.predict}  ({len(list(p.predict.glob('*.wav')))} wavs, {len(mp4s)} mp4s with the new audio)",
        f"  a long video, in windows     {p.predict_long}  (held-out V2A clips joined; docs/long_form.md)",
        f"  per-row status               {p.predict / 'summary.csv'}",
        f"  metrics                      {p.metrics / 'metrics.json'}  and metrics.txt",
        f"  real vs generated figure     {p.figure}",
        "",
        "Try your own captions and videos in the web page (http://127.0.0.1:7860):",
        f"  {result.app_command}",
        "",
        result.table.rstrip(),
        "",
        "What the numbers mean (each mode on its own rows, never pooled; n: rows a figure rests on):",
        "  class_acc   per mode (VT2A, T2A, V2A): a log-mel classifier fitted on real clips names the event",
        f"              class of each generated clip; printed beside chance (1/{result.metrics.get('num_classes', 6)})"
        " and the real audio.",
        "  onset_med   median ms between each of the video's event onsets and the nearest onset found in",
        "              the generated audio, a missed onset counting 1000 ms (lower is better). VT2A and",
        "              V2A follow the video; T2A has no video, so its figure is timing by luck.",
        "  level_dB    median clip RMS and 10 ms-frame noise floor (floor_dB) in dBFS; Δ: generated minus",
        "              the real clips of the same ids (the target is within 3 dB).",
        "  frechet     log-mel statistics distance to the real train clips; ×rvr divides it by real vs",
        "              real (train halves); the real-audio rows give it at the same n. 'all rows' only",
        "              carries these distribution figures (Fréchet, level, noise floor).",
        f"  This demo trained for {steps} steps on CPU with the built-in tiny encoders: a short run of a",
        "  small model, not a model that sounds right; scripts/bench/learning_benchmark.sh measures how",
        "  far more steps go (docs/benchmarks.md).",
    ]
    return "\n".join(lines)
