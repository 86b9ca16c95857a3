"""Load, compose and validate job configs with Hydra (docs/config.md).

Every job has a primary file `configs/<job>.yaml` (train, infer, extract_t2a, extract_vt2a,
demo, bench_learning, evaluate; base.yaml holds the shared keys) and a typed schema in
wavflow/config_schema.py. Hydra composes the file with its defaults list (config groups
`model=...`, `encoders=...`) and the command line; OmegaConf checks keys and types against the
schema. Hydra is used through its compose API: the working directory is left alone and no
`outputs/` or `.hydra/` folder is written; the jobs write the resolved config.yaml themselves.

Command-line values arrive exactly as typed: for a key declared `str` the text after `=` is the
value (`training.experiment_id=007` stays '007', a path may hold ' #' or spaces), except `null`
and a value in quotes, which Hydra reads. Other keys are read by Hydra's override grammar
(`3e-4`, `true`, `[a,b]`, `null`) and must fit the declared type. `+key=value` adds a key.

A user's own file (`--config PATH` outside configs/) may be written in the reference
implementation's layout: `_base_: parent.yaml` chains (resolved beside the file, then in
configs/) and its key names, mapped to ours (wavflow/config_reference.py). Errors are one-line
ConfigErrors naming the key.

`explicit_keys(cfg)` tells which keys of a loaded config the user set (command line, own file):
inference adopts a checkpoint's recorded values for the others.
"""

from __future__ import annotations

import json
import os
import re
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf

from wavflow import config_reference as reference
from wavflow.config_schema import ANY_CHECKS, JOBS, STR_OR_LIST, field_type, is_dict_entry
from wavflow.errors import ConfigError
from wavflow.config_values import validate_config
from wavflow.io_utils import atomic_write_text
from wavflow.shapes import video_seq_lens


def _config_dir() -> Path:
    """configs/ of a checkout, or the copy an installed wheel carries as package data."""
    here = Path(__file__).resolve().parent
    installed = here / "configs"
    return installed if (installed / "base.yaml").is_file() else here.parent / "configs"


CONFIG_DIR = _config_dir()


def _register_resolvers() -> None:
    """${wavflow.clip_seq_len:<seconds>} / ${wavflow.sync_seq_len:<seconds>}: the condition lengths
    a clip duration gives (configs/model/tiny_16k.yaml, small_16k.yaml)."""
    OmegaConf.register_new_resolver("wavflow.clip_seq_len", lambda d: video_seq_lens(float(d))[0], replace=True)
    OmegaConf.register_new_resolver("wavflow.sync_seq_len", lambda d: video_seq_lens(float(d))[1], replace=True)


_register_resolvers()
GROUPS = ("model", "encoders")  # config groups: configs/<group>/<option>.yaml
_MISSING = object()


# ------------------------------------------------------------------ command line
@dataclass(frozen=True)
class LaunchArgs:
    config: str
    overrides: list[str]
    multirun: bool = False


def parse_launch(argv: Sequence[str], default_config: str) -> LaunchArgs:
    """Split launcher arguments into config path, overrides and the `-m`/`--multirun` flag.

    `--config PATH` (or `--config=PATH`) wins over $CONFIG_PATH, which wins over the default,
    configs/<default_config> (never a file of that name in the current directory).
    Every other word must be a `key=value` override.
    """
    config = os.environ.get("CONFIG_PATH") or str(CONFIG_DIR / default_config)
    overrides: list[str] = []
    multirun = False
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
        elif arg in ("-m", "--multirun"):
            multirun = True
        elif arg.startswith("-"):
            raise ConfigError(f"unknown option {arg!r}: use --config PATH and key=value overrides")
        else:
            overrides.append(arg)
        i += 1
    return LaunchArgs(config, overrides, multirun)


def parse_cli(argv: Sequence[str], default_config: str) -> tuple[str, list[str]]:
    """(config path, overrides) for a job that runs one configuration (no `-m` sweeps)."""
    args = parse_launch(argv, default_config)
    if args.multirun:
        raise ConfigError("-m/--multirun sweeps are for training (scripts/launch/train_single_node.sh -m ...)")
    return args.config, args.overrides


def job_of(default_config: str) -> str:
    """'train.yaml' -> 'train' (the job a launcher runs)."""
    return Path(default_config).stem


# ------------------------------------------------------------------ exact values
def quote(text: str) -> str:
    """`text` as a single-quoted Hydra string that reads back exactly."""
    # Hydra: \' is a quote; backslashes are literal except a run right before a quote (or the
    # closing quote), which is written doubled.
    body = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, text)
    return "'" + body.replace("'", "\\'") + "'"


def format_override(key: str, value: Any) -> str:
    """`key=value` that reads back as `value` (str, number, bool, None, or a list of them)."""
    return f"{key}={_format_value(value)}"


def _format_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple, ListConfig)):
        return "[" + ",".join(_format_value(v) for v in value) + "]"
    if isinstance(value, (dict, DictConfig)):  # Hydra's dict keys are bare words
        return "{" + ",".join(f"{k}:{_format_value(v)}" for k, v in value.items()) + "}"
    return quote(str(value))


def _is_quoted(text: str) -> bool:
    t = text.strip()
    return len(t) >= 2 and t[0] == t[-1] and t[0] in "'\""


def _hydra_readable(item: str) -> bool:
    # lazy: hydra's override parser costs ~0.07 s to import (measured after torch, omegaconf)
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        OverridesParser.create().parse_override(item)
    except Exception:  # noqa: BLE001 - any grammar error means "not Hydra syntax"
        return False
    return True


def _split(item: str) -> tuple[str, str, str]:
    """'+a.b=3' -> ('+', 'a.b', '3')."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    key, _, text = item.partition("=")
    prefix = key[: len(key) - len(key.lstrip("+"))]
    key = key[len(prefix):].strip()
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    return prefix, key, text


def prepare_override(job: str, item: str) -> str | None:
    """The Hydra override for a command-line word, keeping string values exact.

    None when the word sets a reference key that this project does not use (reported)."""
    prefix, key, text = _split(item)
    if not prefix:
        mapped = reference.rename(job, key)
        if mapped is None:
            return None
        key = mapped
    if "." not in key and key in GROUPS and not prefix:
        return f"{key}={text}"  # a config group choice: model=large_44k
    declared = field_type(JOBS[job], key)
    if prefix == "+" and declared is not None and not is_dict_entry(JOBS[job], key):
        prefix = ""  # every schema key is present: +key=value on one of them sets it (as before Hydra)
    as_string = declared is str or (key in STR_OR_LIST and not text.lstrip().startswith("["))
    if as_string and text != "null" and not _is_quoted(text):
        text = quote(text)
    elif text.lstrip().startswith("{") and not _hydra_readable(f"{prefix}{key}={text}"):
        text = _from_json(text)  # a mapping typed as JSON ({"a": 1}): Hydra's dicts take bare keys
    elif declared is None and not _hydra_readable(f"{prefix}{key}={text}"):
        text = quote(text)  # a new key's value that Hydra's grammar cannot read stays a string
    return f"{prefix}{key}={text}"


def _from_json(text: str) -> str:
    """A JSON object rewritten in Hydra's syntax (exact, JSON having one reading); else unchanged."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return _format_value(value) if isinstance(value, dict) else text


# ------------------------------------------------------------------ files
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


def _primary_job(path: Path) -> str | None:
    """'train' for configs/train.yaml (a primary file of this project), else None."""
    if path.parent == CONFIG_DIR.resolve() and path.stem in JOBS:
        return path.stem
    return None


@dataclass
class _UserFile:
    job: str | None  # the job of the configs/ file the chain ends in, if any
    body: dict[str, Any]  # the merged user-side content, parents first, child winning


def _read_user_file(path: Path, seen: tuple[Path, ...] = ()) -> _UserFile:
    """A user's config file with its `_base_` parents (the reference layout)."""
    if path in seen:
        raise ConfigError(f"config {path} includes itself through _base_ ({' -> '.join(map(str, seen))})")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)  # OmegaConf reads 1e-4 as a float
    except Exception as exc:  # noqa: BLE001 - yaml and OmegaConf raise several types
        raise ConfigError(f"config {path} is not valid YAML: {_one_line(exc)}") from exc
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path} must hold a mapping at the top level")
    for key in ("_types_", "defaults"):
        if key in raw:
            raise ConfigError(
                f"{key} in {path}: types are declared in wavflow/config_schema.py, and a user file names its "
                "parents with _base_: parent.yaml"
            )
    bases = raw.pop("_base_", None) or []
    merged = OmegaConf.create({})
    job = None
    for base in [bases] if isinstance(bases, str) else bases:
        parent = resolve_config_path(base, relative_to=path.parent)
        if _primary_job(parent) is not None:
            job = _primary_job(parent)  # composed by Hydra, under the user's content
            continue
        upper = _read_user_file(parent, seen + (path,))
        job = upper.job or job
        merged = OmegaConf.merge(merged, upper.body)
    return _UserFile(job, OmegaConf.to_container(OmegaConf.merge(merged, raw), resolve=False))


_REFERENCE_TOP_LEVEL = ("experiment_id", "parallelism", "comm", "metrics")  # see config_reference


def _guess_job(body: dict[str, Any]) -> str:
    """The smallest job schema holding every top-level block of `body` (a saved config.yaml)."""
    for job in ("base", "train", "infer", "extract_vt2a", "demo", "bench_learning", "evaluate"):
        fields = JOBS[job].__dataclass_fields__
        if all(k in fields or k in _REFERENCE_TOP_LEVEL for k in body):
            return job
    return "base"


# ------------------------------------------------------------------ composition
def load_config(
    path: str | os.PathLike, overrides: Sequence[str] = (), validate: bool = True, job: str | None = None
) -> DictConfig:
    """Compose `path` with Hydra, apply overrides, check against the schema, resolve, lock keys.

    `job` names the schema when `path` is a user file whose `_base_` chain does not say it
    (the launchers pass theirs); a configs/<job>.yaml path names its own.
    """
    resolved = resolve_config_path(path)
    user: _UserFile | None = None
    name = _primary_job(resolved)
    if name is None:
        user = _read_user_file(resolved)
        name = user.job if user.job not in (None, "base") else job or user.job or _guess_job(user.body)
        user.body = reference.map_tree(name, user.body)
        _check_user_body(name, user.body, resolved)
    hydra_overrides = [o for o in (prepare_override(name, item) for item in overrides) if o is not None]
    body = user.body if user else {}
    cfg, unresolved = _compose(name, body, hydra_overrides, list(overrides))
    _remember_explicit(cfg, _derived_keys(_set_keys(body, hydra_overrides), unresolved))
    if validate:
        validate_config(cfg)
    return cfg


def _check_user_body(job: str, body: dict[str, Any], path: Path) -> None:
    """Unknown keys and wrong types in a user file, named with the file."""
    try:
        OmegaConf.merge(OmegaConf.structured(JOBS[job]), body)
    except Exception as exc:  # noqa: BLE001 - OmegaConf's validation errors
        key = getattr(exc, "full_key", None) or "?"
        if "not in" in str(exc) or type(exc).__name__ in ("ConfigKeyError", "ConfigAttributeError"):
            raise ConfigError(f"unknown config key '{key}' in {path}") from None
        raise ConfigError(f"config key '{key}' in {path}: {_one_line(exc)}") from None


def _compose(
    job: str, body: dict[str, Any], hydra_overrides: list[str], typed: list[str]
) -> tuple[DictConfig, dict[str, Any]]:
    """(the resolved, key-locked config; the composed tree before interpolations are resolved)."""
    # lazy: hydra's compose API costs ~0.06-0.15 s to import (measured after torch, omegaconf);
    # only composing a config needs it
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore  # lazy: as above
    from hydra.core.global_hydra import GlobalHydra  # lazy: as above

    store = ConfigStore.instance()
    store.store(name=f"_schema_{job}", node=JOBS[job])
    # The primary node: schema first (types), then configs/<job>.yaml, then the user's file.
    store.store(name="_wavflow_job", node={"defaults": [f"_schema_{job}", job, "_self_"], **body})
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3", job_name="wavflow"):
            composed = compose(config_name="_wavflow_job", overrides=hydra_overrides)
    except Exception as exc:  # noqa: BLE001 - Hydra and OmegaConf raise many types
        raise _compose_error(exc, typed) from None
    try:
        plain = OmegaConf.to_container(composed, resolve=True, throw_on_missing=True)
    except Exception as exc:  # noqa: BLE001
        key = getattr(exc, "full_key", None)
        if type(exc).__name__ == "MissingMandatoryValue":
            raise ConfigError(f"config key '{key}' has no value (configs/{job}.yaml must give one)") from None
        raise ConfigError(f"config interpolation failed at '{key}': {_one_line(exc)}") from None
    for key, check in ANY_CHECKS.items():  # the keys OmegaConf cannot type (no Union)
        node: Any = plain
        for part in key.split("."):
            node = node.get(part, _MISSING) if isinstance(node, dict) else _MISSING
        if node is not _MISSING:
            check(key, node)
    # Jobs get a plain DictConfig (locked keys), as before Hydra: they may copy and extend it.
    cfg = OmegaConf.create(plain)
    OmegaConf.set_struct(cfg, True)
    return cfg, OmegaConf.to_container(composed, resolve=False)


def _one_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    keep = [ln for ln in lines if not ln.startswith(("full_key:", "reference_type=", "object_type=", "provider=", "Config search path"))]
    return " ".join(keep) or type(exc).__name__


def _typed_for(key: str, typed: Sequence[str]) -> str:
    for item in typed:
        if item.split("=", 1)[0].lstrip("+") == key:
            return item
    return ""


def _compose_error(exc: BaseException, typed: Sequence[str]) -> ConfigError:
    """Hydra's multi-line exceptions as one line naming the key (and the word typed)."""
    cause = exc.__cause__ or exc.__context__
    key = getattr(cause, "full_key", None) or getattr(exc, "full_key", None)
    text = str(exc)
    m = re.search(r"Could not override '([^']+)'", text)
    if m:
        k = m.group(1)
        return ConfigError(
            f"unknown config key '{k}' in command-line override {_typed_for(k, typed)!r} "
            f"(use +{k}=... to add a new key on purpose)"
        )
    m = re.search(r"Could not find '([^/']+)/([^']+)'", text)
    if m:
        group, option = m.groups()
        options = sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))
        return ConfigError(f"{group}={option}: no such option in configs/{group}/ (options: {', '.join(options)})")
    if key:
        word = _typed_for(key.split("[")[0], typed)
        source = f"override {word!r}" if word else "the config"
        detail = _one_line(cause) if cause is not None else _one_line(exc)
        return ConfigError(f"config key '{key}': {detail} ({source})")
    if "Ambiguous value" in text or "Sweep parameters" in text:
        m2 = re.search(r"argument '([^']*)'", text)
        word = m2.group(1) if m2 else text.splitlines()[0]
        return ConfigError(
            f"override {word!r} holds a comma-separated sweep: quote it for one value, "
            "write [a,b] for a list, or sweep with -m (training)"
        )
    if type(exc).__name__ == "OverrideParseException":
        return ConfigError(f"override cannot be read: {_one_line(exc)} (quote the value)")
    return ConfigError(_one_line(exc))


def apply_overrides(cfg: DictConfig, overrides: Iterable[str], job: str = "infer") -> DictConfig:
    """Apply command-line overrides to an already loaded config, in place, with the same rules."""
    # lazy: hydra's override parser costs ~0.07 s to import (measured after torch, omegaconf)
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for item in overrides:
        hydra_item = prepare_override(job, item)
        if hydra_item is None:
            continue
        parsed = parser.parse_override(hydra_item)
        key, value = parsed.key_or_group, parsed.value()
        old = OmegaConf.select(cfg, key, default=_MISSING)
        if old is _MISSING and parsed.type.name == "CHANGE":
            raise ConfigError(f"unknown config key '{key}' in command-line override {item!r} (use +{key}=... to add a new key on purpose)")
        declared = field_type(JOBS[job], key)
        if declared is not None and value is not None:
            value = _typed_value(job, key, value)  # the schema's type, checked by OmegaConf
        was = OmegaConf.is_struct(cfg)
        OmegaConf.set_struct(cfg, False)
        try:
            OmegaConf.update(cfg, key, value, merge=False, force_add=True)
        finally:
            OmegaConf.set_struct(cfg, was)
        if id(cfg) in _EXPLICIT:
            _remember_explicit(cfg, {key})  # set, even where the value stays the same
    return cfg


def _typed_value(job: str, key: str, value: Any) -> Any:
    """`value` converted to the schema type of `key` by OmegaConf (ConfigError naming the key)."""
    node = OmegaConf.structured(JOBS[job])
    try:
        OmegaConf.update(node, key, value, merge=False)
        out = OmegaConf.select(node, key, throw_on_missing=False)
        return OmegaConf.to_container(out) if isinstance(out, (DictConfig, ListConfig)) else out
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"config key '{key}': {_one_line(exc)}") from None


# ------------------------------------------------------------------ which keys the user set
# A loaded config is plain data; what the user set is kept beside it, per config object, so that
# a job gets it with the config from load_config (an entry is dropped with its config).
@dataclass(frozen=True)
class _SetKeys:
    keys: frozenset[str]  # set by the user when the config was loaded (or by apply_overrides)
    loaded: dict[str, Any]  # every leaf's value then: a key edited in place later counts as set too


_EXPLICIT: dict[int, _SetKeys] = {}
_INTERPOLATED_KEY = re.compile(r"\$\{([A-Za-z_][\w.]*)\}")  # ${data.audio_duration}, not ${resolver:...}


def explicit_keys(cfg: DictConfig) -> frozenset[str] | None:
    """The dotted keys of a `load_config` result that the user set: command-line overrides, the
    keys of a user's own `--config` file (not configs/<job>.yaml's defaults), the values a group
    choice sets (`model=tiny_16k`: model.name, data.target_sample_rate), keys interpolated from
    any of these (tiny_16k's data.clip_seq_len follows data.audio_duration), and keys changed
    since (apply_overrides, or edited in place).
    None for a config of other origin (built by hand, copied without copy_config): treat every
    key as set."""
    record = _EXPLICIT.get(id(cfg))
    if record is None:
        return None
    now = _leaf_keys(OmegaConf.to_container(cfg, resolve=True))
    edited = {k for k, v in now if k not in record.loaded or record.loaded[k] != v}
    return record.keys | edited


def is_explicit(key: str, explicit: frozenset[str] | None) -> bool:
    """Whether the user set `key` (or a block holding it, e.g. `encoders={...}`)."""
    if explicit is None:
        return True
    parts = key.split(".")
    return any(".".join(parts[:i]) in explicit for i in range(1, len(parts) + 1))


def copy_config(cfg: DictConfig) -> DictConfig:
    """A copy that keeps the record of which keys the user set."""
    out = cfg.copy()
    record = _EXPLICIT.get(id(cfg))
    if record is not None:
        _remember(out, record)
    return out


def _remember_explicit(cfg: DictConfig, keys: Iterable[str]) -> None:
    """Record `keys` as set in `cfg` (a config just loaded, or one already recorded)."""
    record = _EXPLICIT.get(id(cfg))
    loaded = record.loaded if record is not None else dict(_leaf_keys(OmegaConf.to_container(cfg, resolve=True)))
    _remember(cfg, _SetKeys(frozenset(keys) | (record.keys if record else frozenset()), loaded))


def _remember(cfg: DictConfig, record: _SetKeys) -> None:
    if id(cfg) not in _EXPLICIT:
        weakref.finalize(cfg, _EXPLICIT.pop, id(cfg), None)  # ids are reused once cfg is gone
    _EXPLICIT[id(cfg)] = record


def _leaf_keys(tree: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
    """(dotted key, value) of every leaf of a nested mapping; an empty mapping is a leaf."""
    if isinstance(tree, dict) and tree:
        for k, v in tree.items():
            yield from _leaf_keys(v, f"{prefix}.{k}" if prefix else str(k))
    elif prefix:
        yield prefix, tree


def _set_keys(body: dict[str, Any], hydra_overrides: Sequence[str]) -> set[str]:
    """The keys the user's own file and the command line set (before interpolations)."""
    keys = {k for k, _ in _leaf_keys(body)}
    for item in hydra_overrides:
        _, key, text = _split(item)
        keys |= _group_keys(key, text.strip()) if key in GROUPS else {key}
    return keys


def _group_keys(group: str, option: str) -> set[str]:
    """The keys configs/<group>/<option>.yaml (and the options it extends) sets to a value;
    interpolated ones are left to follow their sources (`_derived_keys`)."""
    path = CONFIG_DIR / group / f"{option}.yaml"
    if not path.is_file():
        return set()  # Hydra has said which options exist
    text = path.read_text(encoding="utf-8")
    tree = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
    keys: set[str] = set()
    for parent in tree.pop("defaults", None) or []:
        if isinstance(parent, str) and parent != "_self_":
            keys |= _group_keys(group, parent)
    package = "" if re.search(r"^#\s*@package\s+_global_\s*$", text, re.M) else f"{group}."
    for key, value in _leaf_keys(tree):
        if not (isinstance(value, str) and "${" in value):
            keys.add(package + key)
    return keys


def _derived_keys(keys: set[str], unresolved: dict[str, Any]) -> set[str]:
    """`keys` plus every key whose value interpolates one of them, transitively."""
    refs = {
        key: _INTERPOLATED_KEY.findall(value)
        for key, value in _leaf_keys(unresolved)
        if isinstance(value, str) and "${" in value
    }
    out, grew = set(keys), True
    while grew:
        known = frozenset(out)
        new = {k for k, r in refs.items() if k not in out and any(is_explicit(x, known) for x in r)}
        out |= new
        grew = bool(new)
    return out


def save_config(cfg: DictConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML atomically (e.g. `config.yaml` beside checkpoints)."""
    atomic_write_text(path, OmegaConf.to_yaml(cfg, resolve=True))


# ------------------------------------------------------------------ checks shared by the jobs
