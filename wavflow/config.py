"""Load, compose and validate YAML configs (OmegaConf).

A config file may name parents with `_base_: other.yaml` (a string or a list; resolved beside
the file, then in the repository's `configs/`). Parents are merged first and the child wins.

The files in `configs/` are the schema: they may introduce keys. A user's own file (anywhere
else) and command-line `key=value` overrides may only set keys that already exist, with a
value of a compatible type; `+key=value` adds a key on purpose. Everything fails at start-up
with a ConfigError that names the key and, for files, the file.

Keys whose default is null have no type to check against; a schema file declares theirs in
a top-level `_types_` block (`training.max_steps: int`, `data.train_csv: str|list`). Null is
always accepted.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

from wavflow.errors import ConfigError
from wavflow.io_utils import atomic_write_text

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
_MISSING = object()


def resolve_config_path(path: str | os.PathLike, relative_to: Path | None = None) -> Path:
    """Find a config file: as given, beside `relative_to`, then in configs/ (".yaml" optional)."""
    raw = Path(path)
    candidates = [raw]
    if not raw.is_absolute():
        if relative_to is not None:
            candidates.append(relative_to / raw)
        candidates.append(CONFIG_DIR / raw)
    candidates += [c.with_name(c.name + ".yaml") for c in list(candidates) if c.suffix == ""]
    for cand in candidates:
        if cand.is_file():
            return cand.resolve()
    raise ConfigError(f"config file not found: {path} (looked in {', '.join(str(c) for c in candidates)})")


def _is_schema_file(path: Path) -> bool:
    return CONFIG_DIR.resolve() in path.resolve().parents


_TYPE_CHECKS = {
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "bool": lambda v: isinstance(v, bool),
    "list": lambda v: isinstance(v, (list, tuple, ListConfig)),
    "dict": lambda v: isinstance(v, (dict, DictConfig)),
}


def _as_float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _check_declared(key: str, declared: str, new: Any, source: str) -> Any:
    """Check `new` against a `_types_` declaration such as 'int' or 'str|list'."""
    names = [n.strip() for n in declared.split("|")]
    if new is None or any(_TYPE_CHECKS[n](new) for n in names):
        return float(new) if names == ["float"] else new
    if "float" in names and isinstance(new, str) and _as_float(new) is not None:
        return _as_float(new)
    if "str" in names and isinstance(new, (int, float)) and not isinstance(new, bool):
        return str(new)
    raise ConfigError(f"config key '{key}' expects {declared} (or null) but {source} gives {type(new).__name__} {new!r}")


def _check_value(key: str, old: Any, new: Any, source: str, declared: str | None = None) -> Any:
    """Return `new` converted to the type of `old`, or raise a ConfigError naming `key`."""
    if old is None and declared is not None:
        return _check_declared(key, declared, new, source)
    if old is None or new is None or old is _MISSING:
        return new
    if isinstance(old, bool):
        if isinstance(new, bool):
            return new
    elif isinstance(old, int):
        if isinstance(new, int) and not isinstance(new, bool):
            return new
    elif isinstance(old, float):
        if isinstance(new, (int, float)) and not isinstance(new, bool):
            return float(new)
        if isinstance(new, str) and _as_float(new) is not None:  # YAML 1.1 reads 1e-4 as a string
            return _as_float(new)
    elif isinstance(old, str):
        if isinstance(new, (str, int, float)) and not isinstance(new, bool):
            return str(new)
    elif isinstance(old, (list, tuple, ListConfig)):
        if isinstance(new, (list, tuple, ListConfig)):
            return new
    elif isinstance(old, (dict, DictConfig)):
        if isinstance(new, (dict, DictConfig)):
            return new
    else:
        return new
    raise ConfigError(
        f"config key '{key}' expects {type(old).__name__} (default {old!r}) but {source} gives "
        f"{type(new).__name__} {new!r}"
    )


def _merge_checked(
    base: DictConfig, child: dict, source: str, allow_new: bool, types: dict[str, str], prefix: str = ""
) -> None:
    """Merge plain `child` into `base` in place, checking key existence and types."""
    for key, value in child.items():
        full = f"{prefix}{key}"
        old = base[key] if key in base else _MISSING
        if old is _MISSING:
            if not allow_new:
                known = ", ".join(sorted(str(k) for k in base.keys()))
                raise ConfigError(f"unknown config key '{full}' in {source} (known keys here: {known})")
            base[key] = value
            continue
        old_plain = OmegaConf.to_container(old) if isinstance(old, (DictConfig, ListConfig)) else old
        if isinstance(value, dict) and isinstance(old, DictConfig):
            _merge_checked(old, value, source, allow_new, types, prefix=f"{full}.")
        else:
            base[key] = _check_value(full, old_plain, value, source, types.get(full))


def _load_tree(path: Path, seen: tuple[Path, ...] = ()) -> tuple[DictConfig, dict[str, str]]:
    """The composed config of `path` and the `_types_` declarations of its schema files."""
    if path in seen:
        raise ConfigError(f"config {path} includes itself through _base_ ({' -> '.join(map(str, seen))})")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path} must hold a mapping at the top level")
    bases = raw.pop("_base_", None) or []
    declared = raw.pop("_types_", None) or {}
    if isinstance(bases, str):
        bases = [bases]
    merged = OmegaConf.create({})
    types: dict[str, str] = {}
    for base in bases:
        parent, parent_types = _load_tree(resolve_config_path(base, relative_to=path.parent), seen + (path,))
        merged = OmegaConf.merge(merged, parent) if len(merged) else parent
        types.update(parent_types)
    schema = _is_schema_file(path) or not bases
    if declared and not schema:
        raise ConfigError(f"_types_ in {path}: only the schema files in {CONFIG_DIR} declare types")
    for key, spec in declared.items():
        unknown = [n for n in str(spec).split("|") if n.strip() not in _TYPE_CHECKS]
        if unknown:
            raise ConfigError(f"_types_ in {path}: '{key}: {spec}' (types are {', '.join(_TYPE_CHECKS)})")
        types[str(key)] = str(spec)
    _merge_checked(merged, raw, source=str(path), allow_new=schema, types=types)
    return merged, types


def parse_override(item: str) -> tuple[str, Any, bool]:
    """'a.b=3' -> ('a.b', 3, False); '+a.b=3' -> ('a.b', 3, True)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    key, _, text = item.partition("=")
    add = key.startswith("+")
    key = key.lstrip("+").strip()
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from exc
    return key, value, add


def apply_overrides(cfg: DictConfig, overrides: Iterable[str], types: dict[str, str] | None = None) -> DictConfig:
    types = types or {}
    for item in overrides:
        key, value, add = parse_override(item)
        old = OmegaConf.select(cfg, key, default=_MISSING)
        if old is _MISSING and not add:
            raise ConfigError(
                f"unknown config key '{key}' in command-line override {item!r} "
                f"(use +{key}=... to add a new key on purpose)"
            )
        old_plain = OmegaConf.to_container(old) if isinstance(old, (DictConfig, ListConfig)) else old
        new = _check_value(key, None if old is _MISSING else old_plain, value, f"override {item!r}", types.get(key))
        with _unlocked(cfg):
            OmegaConf.update(cfg, key, new, merge=False, force_add=True)
    return cfg


class _unlocked:
    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.was = OmegaConf.is_struct(cfg)

    def __enter__(self) -> DictConfig:
        OmegaConf.set_struct(self.cfg, False)
        return self.cfg

    def __exit__(self, *exc: object) -> None:
        OmegaConf.set_struct(self.cfg, self.was)


def load_config(path: str | os.PathLike, overrides: Sequence[str] = (), validate: bool = True) -> DictConfig:
    """Compose `path` with its `_base_` parents, apply overrides, validate, lock keys."""
    cfg, types = _load_tree(resolve_config_path(path))
    apply_overrides(cfg, overrides, types)
    try:
        OmegaConf.resolve(cfg)
    except Exception as exc:
        raise ConfigError(f"config interpolation failed: {exc}") from exc
    OmegaConf.set_struct(cfg, True)
    if validate:
        validate_config(cfg)
    return cfg


def _get(cfg: DictConfig, key: str) -> Any:
    value = OmegaConf.select(cfg, key, default=_MISSING)
    if value is _MISSING:
        raise ConfigError(f"required config key '{key}' is missing")
    return value


def validate_config(cfg: DictConfig) -> None:
    """Shape and value checks shared by every job (each job adds its own)."""
    from wavflow.model.presets import PRESETS  # late import: the model package is heavy

    name = _get(cfg, "model.name")
    if name not in PRESETS:
        raise ConfigError(f"model.name '{name}' is not a known preset ({', '.join(sorted(PRESETS))})")
    preset = PRESETS[name]
    sr, dur = _get(cfg, "data.target_sample_rate"), _get(cfg, "data.audio_duration")
    if not isinstance(sr, int) or sr <= 0:
        raise ConfigError(f"data.target_sample_rate must be a positive integer, got {sr!r}")
    if not (isinstance(dur, (int, float)) and dur > 0):
        raise ConfigError(f"data.audio_duration must be a positive number of seconds, got {dur!r}")
    if _get(cfg, "data.audio_dim") != preset.latent_dim:
        raise ConfigError(
            f"data.audio_dim={_get(cfg, 'data.audio_dim')} disagrees with model.name '{name}' "
            f"(patch width {preset.latent_dim})"
        )
    if _get(cfg, "data.audio_scale") <= 0:
        raise ConfigError("data.audio_scale must be > 0")
    for stream in ("clip", "sync", "text"):
        for what in ("seq_len", "dim"):
            key = f"data.{stream}_{what}"
            got = _get(cfg, key)
            want = getattr(preset, f"{stream}_{what}")
            if not isinstance(got, int) or got <= 0:
                raise ConfigError(f"{key} must be a positive integer, got {got!r}")
            if want is not None and got != want:
                raise ConfigError(f"{key}={got} disagrees with model.name '{name}', which expects {want}")
    if _get(cfg, "sampling.prediction_type") not in ("x", "v"):
        raise ConfigError(f"sampling.prediction_type must be 'x' or 'v', got {_get(cfg, 'sampling.prediction_type')!r}")
    if not _get(cfg, "sampling.noise_shift") > 0:
        raise ConfigError("sampling.noise_shift must be > 0")
    if not 0.0 <= _get(cfg, "sampling.min_sigma") < 1.0:
        raise ConfigError("sampling.min_sigma must lie in [0, 1)")
    _check_adaptive(cfg)


ADAPTIVE_SOLVERS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")


def _check_adaptive(cfg: DictConfig) -> None:
    """sampling.adaptive_solver / rtol / atol / adaptive_t_end (docs/method.md §3)."""
    solver = _get(cfg, "sampling.adaptive_solver")
    if solver not in ADAPTIVE_SOLVERS:
        raise ConfigError(f"sampling.adaptive_solver must be one of {', '.join(ADAPTIVE_SOLVERS)}, got {solver!r}")
    for key in ("sampling.rtol", "sampling.atol"):
        value = _get(cfg, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ConfigError(f"{key} must be a number > 0, got {value!r}")
    t_end, top = _get(cfg, "sampling.adaptive_t_end"), 1.0 - float(_get(cfg, "sampling.min_sigma"))
    if isinstance(t_end, bool) or not isinstance(t_end, (int, float)) or not 0.0 < t_end < top:
        raise ConfigError(f"sampling.adaptive_t_end must lie in (0, {top:g}) (below 1 - sampling.min_sigma), got {t_end!r}")


def parse_cli(argv: Sequence[str], default_config: str) -> tuple[str, list[str]]:
    """Split launcher arguments into (config path, overrides).

    `--config PATH` (or `--config=PATH`) wins over $CONFIG_PATH, which wins over the default.
    Every other word must be a `key=value` override.
    """
    config = os.environ.get("CONFIG_PATH") or default_config
    overrides: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--config":
            if i + 1 >= len(args):
                raise ConfigError("--config needs a path")
            config = args[i + 1]
            i += 2
            continue
        if arg.startswith("--config="):
            config = arg.split("=", 1)[1]
        elif arg.startswith("-"):
            raise ConfigError(f"unknown option {arg!r}: use --config PATH and key=value overrides")
        else:
            overrides.append(arg)
        i += 1
    return config, overrides


def save_config(cfg: DictConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML atomically (e.g. `config.yaml` beside checkpoints)."""
    atomic_write_text(path, OmegaConf.to_yaml(cfg, resolve=True))
