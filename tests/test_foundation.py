"""Config loading/validation, atomic IO, manifests and derived shapes."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest
import torch

from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError

from wavflow import config as config_mod
from wavflow.config import load_config, parse_cli, save_config
from wavflow.errors import CheckpointError, ConfigError, ManifestError
from wavflow.io_utils import (
    atomic_torch_save,
    atomic_write_csv,
    check_safe_id,
    path_inside,
    safe_torch_load,
    sanitize_filename,
)
from wavflow.manifest import (
    EXTRACT_VT2A_COLUMNS,
    TRAIN_COLUMNS,
    ManifestReport,
    check_files,
    check_flags,
    check_ids,
    read_manifest,
    resolve_path,
)
from wavflow.shapes import latent_seq_len, sync_segment_count, target_num_samples, video_seq_lens


# ---------------------------------------------------------------- shapes
def test_derived_lengths_match_spec():
    assert target_num_samples(16000, 8.0) == 128000 and latent_seq_len(16000, 8.0) == 640
    assert target_num_samples(44100, 8.0) == 352800 and latent_seq_len(44100, 8.0) == 1764
    assert latent_seq_len(16000, 0.3) == 24  # 4800 samples
    assert latent_seq_len(16000, 0.3001) == 25  # ceil, not floor
    assert sync_segment_count(8.0) == 24 and video_seq_lens(8.0) == (64, 192)
    assert video_seq_lens(2.0) == (16, 40)
    assert sync_segment_count(0.5) == 0


# ---------------------------------------------------------------- config
def test_base_config_loads_with_defaults():
    cfg = load_config("base.yaml")
    assert cfg.model.name == "medium_16k"
    assert cfg.data.audio_dim == 200 and cfg.data.audio_scale == 3.0
    assert (cfg.data.clip_seq_len, cfg.data.sync_seq_len, cfg.data.text_seq_len) == (64, 192, 77)
    assert cfg.sampling.prediction_type == "x"


def test_overrides_convert_and_check_types():
    cfg = load_config("base.yaml", ["data.audio_duration=4", "sampling.num_steps=25", "model.name=tiny_16k"])
    assert cfg.data.audio_duration == 4.0 and isinstance(cfg.data.audio_duration, float)
    assert cfg.sampling.num_steps == 25
    with pytest.raises(ConfigError, match="sampling.num_steps"):
        load_config("base.yaml", ["sampling.num_steps=many"])
    with pytest.raises(ConfigError, match="data.audio_dur"):
        load_config("base.yaml", ["data.audio_dur=4"])
    with pytest.raises(ConfigError, match="not of the form"):
        load_config("base.yaml", ["data.audio_duration"])


def test_scientific_notation_and_declared_types(tmp_path: Path):
    cfg = load_config("base.yaml", ["sampling.noise_shift=3e0", "sampling.min_sigma=1e-4"])
    assert cfg.sampling.min_sigma == pytest.approx(1e-4) and isinstance(cfg.sampling.noise_shift, float)
    user = tmp_path / "u.yaml"
    user.write_text("_base_: base.yaml\nsampling:\n  min_sigma: 1e-5\n")  # a string to YAML 1.1
    assert load_config(user).sampling.min_sigma == pytest.approx(1e-5)
    # keys with a null default are typed by the schema (wavflow/config_schema.py)
    assert load_config("base.yaml", ["data.data_root=/data"]).data.data_root == "/data"
    assert load_config("base.yaml", ["data.data_root=null"]).data.data_root is None
    with pytest.raises(ConfigError, match="data.feature_norm"):
        load_config("base.yaml", ["data.feature_norm=sometimes"])
    bad = tmp_path / "types.yaml"
    bad.write_text("_base_: base.yaml\n_types_:\n  data.data_root: int\n")
    with pytest.raises(ConfigError, match="_types_ .*config_schema.py"):
        load_config(bad)


def test_every_yaml_key_is_declared_in_the_schema():
    """Every key of every job file has a declared type: composing would fail otherwise, and a
    null default must be declared Optional (else any later value would be unchecked)."""
    from wavflow.config_schema import JOBS, field_type

    for path in sorted(config_mod.CONFIG_DIR.glob("*.yaml")):
        # a job file, or a variant that names its job file through `_base_`
        # (bench_learning_instruments.yaml -> bench_learning.yaml)
        job = path.stem if path.stem in JOBS else config_mod._read_user_file(path.resolve()).job
        assert job in JOBS, f"{path.name}: neither a job file nor a _base_ chain ending in one"
        cfg = load_config(path, validate=False)
        for key, _ in _leaves(OmegaConf.to_container(cfg)):
            assert field_type(JOBS[job], key) is not None, f"{path.name}: {key} is not in the schema"


def _leaves(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def test_plus_override_adds_key_and_struct_blocks_typos():
    cfg = load_config("base.yaml", ["+data.note=hello"])
    assert cfg.data.note == "hello"
    with pytest.raises(ConfigAttributeError, match="not_a_key"):
        _ = cfg.data.not_a_key


def test_user_file_may_not_invent_keys(tmp_path: Path):
    good = tmp_path / "good.yaml"
    good.write_text("_base_: base.yaml\ndata:\n  audio_duration: 2.0\n")
    assert load_config(good).data.audio_duration == 2.0
    bad = tmp_path / "bad.yaml"
    bad.write_text("_base_: base.yaml\ndata:\n  sample_rate: 22050\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert "data.sample_rate" in str(err.value) and str(bad) in str(err.value)
    typed = tmp_path / "typed.yaml"
    typed.write_text("_base_: base.yaml\ndata:\n  target_sample_rate: fast\n")
    with pytest.raises(ConfigError, match="data.target_sample_rate"):
        load_config(typed)


def test_shape_consistency_names_the_key():
    with pytest.raises(ConfigError, match="data.clip_seq_len"):
        load_config("base.yaml", ["data.clip_seq_len=16"])  # medium_16k pins 64
    with pytest.raises(ConfigError, match="data.audio_dim"):
        load_config("base.yaml", ["data.audio_dim=100"])
    with pytest.raises(ConfigError, match="model.name"):
        load_config("base.yaml", ["model.name=huge_99k"])
    with pytest.raises(ConfigError, match="prediction_type"):
        load_config("base.yaml", ["sampling.prediction_type=eps"])
    # small presets take their lengths from the data block
    cfg = load_config("base.yaml", ["model.name=tiny_16k", "data.clip_seq_len=16", "data.sync_seq_len=40"])
    assert cfg.data.clip_seq_len == 16


def test_missing_and_cyclic_config(tmp_path: Path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    a = tmp_path / "a.yaml"
    a.write_text("_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(a)


def test_parse_cli(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("CONFIG_PATH", raising=False)
    assert parse_cli(["a.b=1", "--config", "x.yaml", "c=2"], "d.yaml") == ("x.yaml", ["a.b=1", "c=2"])
    assert parse_cli(["--config=y.yaml"], "d.yaml") == ("y.yaml", [])
    # the default is the packaged file, never a same-named file in the current directory
    assert parse_cli([], "train.yaml") == (str(config_mod.CONFIG_DIR / "train.yaml"), [])
    with pytest.raises(ConfigError, match="sweeps are for training"):
        parse_cli(["-m", "a=1,2"], "d.yaml")
    assert config_mod.parse_launch(["--multirun", "a=1,2"], "d.yaml").multirun
    monkeypatch.setenv("CONFIG_PATH", "env.yaml")
    assert parse_cli([], "d.yaml") == ("env.yaml", [])
    with pytest.raises(ConfigError, match="--bogus"):
        parse_cli(["--bogus"], "d.yaml")


def test_save_config_round_trip(tmp_path: Path):
    cfg = load_config("base.yaml", ["data.audio_duration=3.5"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg


def test_every_job_config_in_configs_loads():
    for path in sorted(config_mod.CONFIG_DIR.glob("*.yaml")):
        # evaluate.yaml builds no generator: it is loaded as the evaluate job loads it
        load_config(path, validate=path.name != "evaluate.yaml")


# ---------------------------------------------------------------- io
def test_atomic_save_and_safe_load(tmp_path: Path):
    path = tmp_path / "sub" / "ckpt.pth"
    atomic_torch_save({"w": torch.arange(3.0)}, path)
    assert torch.equal(safe_torch_load(path)["w"], torch.arange(3.0))
    assert [p.name for p in path.parent.iterdir()] == ["ckpt.pth"]  # no temp files left
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(CheckpointError, match="ckpt.pth"):
        safe_torch_load(path)
    with pytest.raises(CheckpointError, match="not found"):
        safe_torch_load(tmp_path / "missing.pth")


def test_safe_load_refuses_pickled_code(tmp_path: Path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"x": Evil()}, path)
    with pytest.raises(CheckpointError, match="evil.pth"):
        safe_torch_load(path)


def test_atomic_write_keeps_old_file_on_failure(tmp_path: Path):
    path = tmp_path / "x.csv"
    atomic_write_csv(pd.DataFrame({"a": [1]}), path)

    class Boom:
        def to_csv(self, *a, **k):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic_write_csv(Boom(), path)
    assert path.read_text() == "a\n1\n"
    assert len(list(tmp_path.iterdir())) == 1


def test_ids_and_file_names(tmp_path: Path):
    assert check_safe_id("clip_001") == "clip_001"
    for bad in ["../x", "a/b", "a\\b", "..", "", " a", "a\nb", "a\tb", "-a", "x" * 201]:
        with pytest.raises(ManifestError):
            check_safe_id(bad)
    assert sanitize_filename("../../etc/passwd") == "etc_passwd"
    assert sanitize_filename("a b?c") == "a_b_c"
    assert sanitize_filename("///") == "sample"
    assert path_inside(tmp_path, tmp_path / "a" / "b")
    assert not path_inside(tmp_path, tmp_path / ".." / "x")


# ---------------------------------------------------------------- manifests
def test_manifest_reports_every_bad_row(tmp_path: Path):
    (tmp_path / "a.wav").write_bytes(b"x")
    csv = tmp_path / "m.csv"
    csv.write_text(
        "id,audio_path,features_path,video_exist,text_exist\n"
        "a,a.wav,f.pth,1,1\n"
        "a,a.wav,f.pth,2,1\n"
        "../b,missing.wav,f.pth,0,yes\n"
    )
    df = read_manifest(csv, TRAIN_COLUMNS)
    report = ManifestReport(csv)
    check_ids(df, report)
    check_flags(df, report, ["video_exist", "text_exist"])
    check_files(df, report, "audio_path", tmp_path)
    text = report.format()
    assert "line 3" in text and "duplicate id" in text
    assert "line 4" in text and "unsafe" in text
    assert "video_exist='2'" in text and "text_exist='yes'" in text
    assert "missing.wav" in text
    assert report.bad_rows == {1, 2}
    with pytest.raises(ManifestError):
        report.raise_if_any()


def test_manifest_columns_and_quoting(tmp_path: Path):
    csv = tmp_path / "m.csv"
    csv.write_text('id,audio_path,video_path,caption\n1,a.wav,a.mp4,"dogs, barking ""loudly"""\n2,b.wav,b.mp4,\n')
    df = read_manifest(csv, EXTRACT_VT2A_COLUMNS)
    assert df.loc[0, "caption"] == 'dogs, barking "loudly"' and df.loc[1, "caption"] == ""
    assert df.loc[0, "id"] == "1"  # ids stay strings
    bad = tmp_path / "bad.csv"
    bad.write_text("id,caption\n1,x\n")
    with pytest.raises(ManifestError, match="audio_path"):
        read_manifest(bad, EXTRACT_VT2A_COLUMNS)
    assert resolve_path("x.wav", tmp_path) == (tmp_path / "x.wav").absolute()
    assert resolve_path("/abs/x.wav", tmp_path) == Path("/abs/x.wav")


def test_atomic_files_get_the_umask_mode(tmp_path: Path):
    old = os.umask(0o022)
    try:
        path = atomic_torch_save({"a": torch.zeros(1)}, tmp_path / "x.pth")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def test_duplicate_ids_across_csvs_name_the_first_file(tmp_path: Path):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    a.write_text("id,audio_path,caption\nx,x.wav,c\n")
    b.write_text("id,audio_path,caption\ny,y.wav,c\nx,x.wav,c\n")
    seen: dict = {}
    reports = []
    for path in (a, b):
        report = ManifestReport(path)
        check_ids(read_manifest(path, ("id", "audio_path", "caption")), report, seen=seen)
        reports.append(report)
    assert not reports[0].problems
    assert [str(p) for p in reports[1].problems] == [f"line 3 (id 'x'): duplicate id (first in {a} line 2)"]


def test_adaptive_sampler_keys_are_checked():
    cfg = load_config("infer.yaml", ["sampling.rtol=1e-2", "sampling.adaptive_solver=bosh3"])
    assert (cfg.sampling.rtol, cfg.sampling.atol, cfg.sampling.adaptive_t_end) == (1e-2, 1e-3, 0.98)
    for bad, said in (("sampling.rtol=0", "sampling.rtol must be a number > 0"),
                      ("sampling.adaptive_solver=rk4", "sampling.adaptive_solver must be one of"),
                      ("sampling.adaptive_t_end=1.0", r"sampling.adaptive_t_end must lie in \(0, 1\)")):
        with pytest.raises(ConfigError, match=said):
            load_config("infer.yaml", [bad])
