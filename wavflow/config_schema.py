"""Typed schema of every job's config (structured configs for Hydra/OmegaConf).

The values live in the YAML files of `configs/` (the readable defaults, with comments); these
dataclasses only declare which keys exist and their types, so every field is MISSING here and
a YAML file must give it. Hydra merges the files and the command line into these classes, so
a key that is not declared, or a value of the wrong type, fails in the library with the key
named (wavflow/config.py turns that into a one-line ConfigError).

Optional[...] marks the keys that may be null. `data.train_csv` (a path or a list of paths) and
`architectures.*` (a mapping or null) would need Union types, which OmegaConf lacks (and it
cannot set a mapping over a null Optional[Dict]): they are declared Any and checked by
ANY_CHECKS.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

from wavflow.errors import ConfigError


def _node(cls: type) -> Any:
    return field(default_factory=cls)


# ------------------------------------------------------------------ shared blocks (base.yaml)
@dataclass
class ModelBase:
    name: str = MISSING
    spectral_skip: bool = False  # training only: loaded weights say whether they have it
    level_head: bool = False  # training only: loaded weights say whether they have it


@dataclass
class FeatureNormRMS:
    """Per-dimension RMS of each normalised condition stream; null: the stream's own RMS std."""

    clip_features: Optional[float] = MISSING
    sync_features: Optional[float] = MISSING
    text_features: Optional[float] = MISSING


@dataclass
class DataBase:
    target_sample_rate: int = MISSING
    audio_duration: float = MISSING
    audio_dim: int = MISSING
    audio_scale: float = MISSING
    data_root: Optional[str] = MISSING
    clip_seq_len: int = MISSING
    sync_seq_len: int = MISSING
    text_seq_len: int = MISSING
    clip_dim: int = MISSING
    sync_dim: int = MISSING
    text_dim: int = MISSING
    feature_norm: Optional[bool] = MISSING
    feature_norm_rms: FeatureNormRMS = _node(FeatureNormRMS)


@dataclass
class SamplingBase:
    prediction_type: str = MISSING
    noise_shift: float = MISSING
    min_sigma: float = MISSING
    noise_scale: float = MISSING
    method: str = MISSING
    num_steps: int = MISSING
    adaptive_solver: str = MISSING
    rtol: float = MISSING
    atol: float = MISSING
    adaptive_t_end: float = MISSING


@dataclass
class Encoders:
    profile: str = MISSING
    clip_model: str = MISSING
    clip_tokenizer: str = MISSING
    clip_pretrained: Optional[str] = MISSING
    synchformer_ckpt: Optional[str] = MISSING
    cache_dir: Optional[str] = MISSING
    allow_download: bool = MISSING


@dataclass
class BaseConfig:
    model: ModelBase = _node(ModelBase)
    data: DataBase = _node(DataBase)
    sampling: SamplingBase = _node(SamplingBase)
    encoders: Encoders = _node(Encoders)


# ------------------------------------------------------------------ train.yaml
@dataclass
class TrainModel(ModelBase):
    empty_string_feat_path: Optional[str] = MISSING


@dataclass
class TrainData(DataBase):
    train_csv: Any = MISSING  # str | list[str] | null: check_str_or_list
    on_bad_row: str = MISSING
    max_failed_fraction: float = MISSING
    validate_features: bool = MISSING


@dataclass
class TrainSampling(SamplingBase):
    mean: float = MISSING
    scale: float = MISSING
    uniform_frac: float = MISSING


@dataclass
class LoRA:
    rank: Optional[int] = MISSING  # null / 0: no adapters
    alpha: Optional[float] = MISSING  # null: the rank (scale 1)
    dropout: float = MISSING
    targets: Optional[List[str]] = MISSING  # null: wavflow.train.lora.DEFAULT_TARGETS


@dataclass
class FSDP:
    param_dtype: Optional[str] = MISSING  # null | float32 | bfloat16 | float16 (wavflow/train/fsdp.py)
    reduce_dtype: Optional[str] = MISSING
    reshard_after_forward: bool = MISSING


@dataclass
class Training:
    output_dir: str = MISSING
    experiment_id: str = MISSING
    seed: int = MISSING
    device: str = MISSING
    precision: str = MISSING
    epochs: int = MISSING
    max_steps: Optional[int] = MISSING
    batch_size: int = MISSING
    grad_accum_steps: int = MISSING
    num_workers: int = MISSING
    persistent_workers: bool = MISSING
    repeat_factor: int = MISSING
    lr: Optional[float] = MISSING  # null: blr * effective_batch / 256
    blr: float = MISSING
    min_lr: float = MISSING
    warmup_steps: int = MISSING
    lr_schedule: str = MISSING
    steps: List[int] = MISSING
    gamma: float = MISSING
    weight_decay: float = MISSING
    spectral_skip_lr_scale: float = MISSING
    clip_grad_norm: float = MISSING
    max_nonfinite_steps: int = MISSING
    loss_type: str = MISSING
    label_drop_prob: float = MISSING
    video_drop_prob: Optional[float] = MISSING
    text_drop_prob: Optional[float] = MISSING
    ema_decay1: float = MISSING
    ema_decay2: float = MISSING
    ema_warmup: bool = MISSING
    compile: bool = MISSING
    optimizer_impl: str = MISSING
    ema_impl: str = MISSING
    conv_impl: str = MISSING
    attention_backend: str = MISSING
    gradient_checkpointing: Any = MISSING  # true | false | k (every k-th block) | [block indices]
    strategy: str = MISSING  # ddp | fsdp
    fsdp: FSDP = _node(FSDP)
    log_freq: int = MISSING
    gen_train_freq: int = MISSING
    checkpoint_freq: int = MISSING
    checkpoint_save_epoch: int = MISSING
    ema_checkpoint_save_epoch: int = MISSING
    save_every_steps: int = MISSING
    resume: bool = MISSING
    tensorboard: bool = MISSING
    init_from: Optional[str] = MISSING  # fine-tuning: a new run's starting weights (wavflow/train/finetune.py)
    init_from_ema: bool = MISSING
    init_from_sha256: Optional[str] = MISSING
    trainable: Optional[List[str]] = MISSING
    lora: LoRA = field(default_factory=LoRA)


@dataclass
class Checkpoint:
    initial_load_path: Optional[str] = MISSING
    initial_load_model_only: bool = MISSING


@dataclass
class Eval:
    cfg: float = MISSING
    num_steps: int = MISSING


@dataclass
class TrainConfig:
    model: TrainModel = _node(TrainModel)
    data: TrainData = _node(TrainData)
    sampling: TrainSampling = _node(TrainSampling)
    encoders: Encoders = _node(Encoders)
    training: Training = _node(Training)
    checkpoint: Checkpoint = _node(Checkpoint)
    eval: Eval = _node(Eval)


# ------------------------------------------------------------------ infer.yaml
@dataclass
class InferModel(ModelBase):
    ckpt_path: Optional[str] = MISSING
    use_ema: bool = MISSING


@dataclass
class InferData(DataBase):
    csv_path: Optional[str] = MISSING


@dataclass
class Inference:
    cfg: float = MISSING
    cfg_interval: Optional[List[float]] = MISSING
    batched_cfg: bool = MISSING
    batch_size: int = MISSING
    seed: int = MISSING
    trim_to_duration: bool = MISSING
    device: str = MISSING
    precision: str = MISSING
    allow_config_mismatch: bool = MISSING
    conv_impl: str = MISSING
    attention_backend: str = MISSING
    compile: bool = MISSING
    long_form: str = MISSING
    window_overlap_sec: Optional[float] = MISSING
    window_batch: int = MISSING


@dataclass
class InferOutput:
    output_dir: str = MISSING
    loudness_norm: bool = MISSING
    loudness_target_lufs: float = MISSING
    loudness_from_model: bool = False
    mux_video: bool = MISSING
    overwrite: bool = MISSING


@dataclass
class InferConfig:
    model: InferModel = _node(InferModel)
    data: InferData = _node(InferData)
    sampling: SamplingBase = _node(SamplingBase)
    encoders: Encoders = _node(Encoders)
    inference: Inference = _node(Inference)
    output: InferOutput = _node(InferOutput)


# ------------------------------------------------------------------ app.yaml (infer.yaml + app)
@dataclass
class AppSettings:
    host: str = MISSING
    port: int = MISSING
    concurrency: int = MISSING
    max_upload_mb: float = MISSING
    max_duration_sec: float = MISSING


@dataclass
class AppConfig(InferConfig):
    app: AppSettings = _node(AppSettings)


# ------------------------------------------------------------------ extract_t2a.yaml / extract_vt2a.yaml
@dataclass
class ExtractData(DataBase):
    csv_path: str = MISSING
    max_failed_fraction: float = MISSING


@dataclass
class ExtractOutput:
    pth_dir: str = MISSING
    csv_path: str = MISSING
    packed_dir: Optional[str] = MISSING
    shard_rows: int = MISSING


@dataclass
class Extraction:
    mode: str = MISSING
    duration_sec: float = MISSING
    batch_size: int = MISSING
    num_workers: int = MISSING
    device: str = MISSING
    save_interval: int = MISSING
    report_max_rows: int = MISSING
    strict_paths: bool = MISSING


@dataclass
class ExtractConfig:
    model: ModelBase = _node(ModelBase)
    data: ExtractData = _node(ExtractData)
    sampling: SamplingBase = _node(SamplingBase)
    encoders: Encoders = _node(Encoders)
    output: ExtractOutput = _node(ExtractOutput)
    extraction: Extraction = _node(Extraction)


# ------------------------------------------------------------------ demo.yaml
@dataclass
class DemoTrain:
    max_steps: int = MISSING
    batch_size: int = MISSING
    lr: float = MISSING
    warmup_steps: int = MISSING
    precision: str = MISSING
    time_mean: float = MISSING
    time_scale: float = MISSING


@dataclass
class DemoPredict:
    cfg: float = MISSING
    use_ema: bool = MISSING
    loudness_target_lufs: Any = MISSING  # 'model', 'data', a number (LUFS) or null


@dataclass
class Demo:
    out_dir: str = MISSING
    dataset: str = MISSING  # shapes | instruments (wavflow.demo.make_dataset.DATASETS)
    n: int = MISSING
    seed: int = MISSING
    holdout_frac: float = MISSING
    v2a_frac: float = MISSING
    t2a_frac: float = MISSING
    nproc: int = MISSING
    fresh: bool = MISSING
    train: DemoTrain = _node(DemoTrain)
    predict: DemoPredict = _node(DemoPredict)
    figure_clips: int = MISSING
    long_video_clips: int = MISSING


@dataclass
class DemoConfig(BaseConfig):
    demo: Demo = _node(Demo)


# ------------------------------------------------------------------ bench_learning.yaml
@dataclass
class BenchMemorise:
    max_steps: int = MISSING
    eval_every: int = MISSING
    repeat_factor: int = MISSING
    eval_cfg: Optional[float] = None


@dataclass
class BenchGeneralise:
    n: int = MISSING
    holdout_frac: float = MISSING
    no_caption_frac: float = MISSING
    no_video_frac: float = MISSING
    max_steps: int = MISSING
    max_train_minutes: float = MISSING
    eval_every: int = MISSING
    repeat_factor: int = MISSING
    eval_cfg: Optional[float] = None


@dataclass
class BenchRobustness:
    model: Optional[str] = None  # model preset of this stage's runs; null: the config's model.name
    n: int = MISSING
    holdout_frac: float = MISSING
    no_caption_frac: float = MISSING
    no_video_frac: float = MISSING
    max_steps: int = MISSING
    repeat_factor: int = MISSING
    eval_cfg: Optional[float] = None
    # each: {name: ..., <make_dataset keyword>: value, ...} (wavflow/demo/learning_benchmark.py)
    variations: List[Dict[str, Any]] = MISSING


@dataclass
class BenchFinetune:
    model: Optional[str] = None  # model preset of pre-training and fine-tuning; null: the config's model.name
    new_class: str = MISSING
    n: int = MISSING
    holdout_frac: float = MISSING
    no_caption_frac: float = MISSING
    no_video_frac: float = MISSING
    pretrain_steps: int = MISSING
    clips: int = MISSING
    replay_clips: int = MISSING
    steps: int = MISSING
    lr: float = MISSING
    warmup_steps: int = MISSING
    batch_size: int = MISSING
    old_eval_clips_per_class: int = MISSING
    eval_cfg: Optional[float] = None
    ways: Dict[str, List[str]] = MISSING  # name -> training key=value words (wavflow/demo/finetune_stage.py)
    only_ways: Optional[List[str]] = None  # null: every way; else the names of those to run


@dataclass
class BenchFinetuneTargets:
    new_class_acc: Dict[str, float] = MISSING  # mode -> least accuracy on the new class's held-out clips
    new_onset_ms: Dict[str, float] = MISSING   # mode -> most median onset error (ms) on them
    old_keep: Optional[float] = None  # least share of the old classes' accuracy kept, every mode; null: not judged
    max_train_minutes: Optional[float] = None  # most fine-tuning time per way; null: not judged


@dataclass
class BenchGeneraliseTargets:
    class_acc: Dict[str, float] = MISSING  # mode -> least class accuracy on that mode's rows
    onset_ms: Dict[str, float] = MISSING   # mode -> most median onset error (ms)
    frechet_ratio: Optional[float] = None  # most Fréchet (all rows) / real-vs-real; null: not judged


@dataclass
class BenchTargets:
    memorise_ratio: float = MISSING
    generalise: BenchGeneraliseTargets = _node(BenchGeneraliseTargets)
    robustness: BenchGeneraliseTargets = _node(BenchGeneraliseTargets)  # same per-mode form
    finetune: BenchFinetuneTargets = _node(BenchFinetuneTargets)


@dataclass
class Bench:
    out_dir: str = MISSING
    dataset: str = MISSING  # shapes | instruments: the built-in set every stage makes
    stages: List[str] = MISSING
    seed: int = MISSING
    nproc: int = MISSING
    precision: str = MISSING
    lr: float = MISSING
    warmup_steps: int = MISSING
    time_mean: float = MISSING
    time_scale: float = MISSING
    batch_size: int = MISSING
    eval_cfg: float = MISSING
    train_extra: List[str] = MISSING
    memorise: BenchMemorise = _node(BenchMemorise)
    generalise: BenchGeneralise = _node(BenchGeneralise)
    robustness: BenchRobustness = _node(BenchRobustness)
    finetune: BenchFinetune = _node(BenchFinetune)
    targets: BenchTargets = _node(BenchTargets)


@dataclass
class BenchConfig(BaseConfig):
    bench: Bench = _node(Bench)


# ------------------------------------------------------------------ evaluate.yaml (no base.yaml)
@dataclass
class EvalData:
    data_root: Optional[str] = MISSING
    audio_duration: float = MISSING


@dataclass
class EvalWeights:
    cache_dir: Optional[str] = MISSING
    passt: Optional[str] = MISSING
    panns: Optional[str] = MISSING
    vggish: Optional[str] = MISSING
    imagebind: Optional[str] = MISSING
    clap: Optional[str] = MISSING
    clap_hf_home: Optional[str] = MISSING
    synchformer: Optional[str] = MISSING


@dataclass
class EvalArchitectures:
    imagebind: Any = MISSING  # a mapping or null (Optional[Dict] cannot take a dict override over null)
    synchformer: Any = MISSING  # a mapping or null


@dataclass
class EvalMetrics:
    enabled: List[str] = MISSING
    is_splits: int = MISSING
    is_seed: int = MISSING
    desync_segments: int = MISSING


@dataclass
class Evaluation:
    output_dir: Optional[str] = MISSING
    device: str = MISSING


@dataclass
class EvaluateConfig:
    data: EvalData = _node(EvalData)
    weights: EvalWeights = _node(EvalWeights)
    architectures: EvalArchitectures = _node(EvalArchitectures)
    metrics: EvalMetrics = _node(EvalMetrics)
    evaluation: Evaluation = _node(Evaluation)


# Job name (= the primary file configs/<job>.yaml) -> its schema.
JOBS: dict[str, type] = {
    "base": BaseConfig,
    "train": TrainConfig,
    "infer": InferConfig,
    "extract_t2a": ExtractConfig,
    "extract_vt2a": ExtractConfig,
    "demo": DemoConfig,
    "bench_learning": BenchConfig,
    "evaluate": EvaluateConfig,
    "app": AppConfig,
}

# Keys whose value is a path or a list of paths (declared Any above).
STR_OR_LIST = frozenset({"data.train_csv"})


def _resolve(schema: type, key: str) -> tuple[Any, bool]:
    """(the declared type of dotted `key` in `schema`, Optional unwrapped, or None if undeclared;
    whether the path passes through a Dict[str, V] field, whose keys are not fixed)."""
    node: Any = schema
    in_dict = False
    for part in key.split("."):
        if typing.get_origin(node) is dict:  # Dict[str, V]: any key, of value type V
            node, in_dict = _unwrap_optional(typing.get_args(node)[1]), True
            continue
        if not dataclasses.is_dataclass(node):
            return None, in_dict
        hints = typing.get_type_hints(node)
        if part not in hints:
            return None, in_dict
        node = _unwrap_optional(hints[part])
    return node, in_dict


def field_type(schema: type, key: str) -> Any:
    """The declared type of dotted `key` in `schema` (Optional unwrapped), or None if undeclared."""
    return _resolve(schema, key)[0]


def is_dict_entry(schema: type, key: str) -> bool:
    """Whether dotted `key` lies inside a Dict[str, V] field of `schema` (its keys are not fixed)."""
    return _resolve(schema, key)[1]


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def check_mapping_or_null(key: str, value: Any) -> None:
    """`architectures.*`: constructor arguments (a mapping) or null."""
    if value is not None and not isinstance(value, dict):
        raise ConfigError(f"config key '{key}' expects a mapping (or null), got {type(value).__name__} {value!r}")


def check_str_or_list(key: str, value: Any) -> None:
    """`data.train_csv`: null, a path, or a non-empty list of paths."""
    if value is None or isinstance(value, str):
        return
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return
    raise ConfigError(f"config key '{key}' expects a path or a list of paths (or null), got {type(value).__name__} {value!r}")


# The keys declared Any above, and the check each value must pass (wavflow/config.py runs them).
ANY_CHECKS = {
    "data.train_csv": check_str_or_list,
    "architectures.imagebind": check_mapping_or_null,
    "architectures.synchformer": check_mapping_or_null,
}
