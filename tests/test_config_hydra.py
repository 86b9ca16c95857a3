"""Hydra composition (issue 11): exact command-line values, config groups, the reference's
config files, sweeps, and an installed (non-editable) WavFlow finding its configs."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from wavflow.config import format_override, load_config, prepare_override, quote, save_config
from wavflow.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "tests/data/reference_configs"

# (override as typed, dotted key, the value the job must see)
EXACT = [
    ("training.experiment_id=007", "training.experiment_id", "007"),
    ("training.experiment_id=1_000", "training.experiment_id", "1_000"),
    ("data.data_root=0x1F", "data.data_root", "0x1F"),
    ("training.experiment_id=3e-4", "training.experiment_id", "3e-4"),
    ("training.output_dir=/data/run #2/out", "training.output_dir", "/data/run #2/out"),
    ("data.data_root=/my data/with  two spaces", "data.data_root", "/my data/with  two spaces"),
    ('model.empty_string_feat_path=a dog, barking "loud" \'twice\'', "model.empty_string_feat_path",
     'a dog, barking "loud" \'twice\''),
    ("checkpoint.initial_load_path=C:\\runs\\x\\", "checkpoint.initial_load_path", "C:\\runs\\x\\"),
    ("data.data_root=null", "data.data_root", None),
    ("training.max_steps=null", "training.max_steps", None),
    ("data.train_csv=[a.csv,b.csv]", "data.train_csv", ["a.csv", "b.csv"]),
    ("data.train_csv=['/x #1/a.csv','/y, z/b.csv']", "data.train_csv", ["/x #1/a.csv", "/y, z/b.csv"]),
    ("data.train_csv=/data/run #2/train.csv", "data.train_csv", "/data/run #2/train.csv"),
    ("data.train_csv=null", "data.train_csv", None),
    ("training.resume=false", "training.resume", False),
    ("training.ema_warmup=true", "training.ema_warmup", True),
    ("training.lr=3e-4", "training.lr", 3e-4),
    ("training.lr=1_000", "training.lr", 1000.0),
    ("training.max_steps=1_000", "training.max_steps", 1000),
    ("training.steps=[10,20]", "training.steps", [10, 20]),
    ("+data.note=hello world #1", "data.note", "hello world #1"),
]


@pytest.mark.parametrize(("word", "key", "want"), EXACT, ids=[w for w, _, _ in EXACT])
def test_command_line_values_round_trip_exactly(tmp_path: Path, word: str, key: str, want: object):
    cfg = load_config("train.yaml", [word], validate=False)
    got = OmegaConf.select(cfg, key)
    got = OmegaConf.to_container(got) if OmegaConf.is_config(got) else got
    assert got == want and type(got) is type(want)
    save_config(cfg, tmp_path / "config.yaml")  # what a run writes beside its outputs
    for reread in (yaml.safe_load((tmp_path / "config.yaml").read_text()),
                   OmegaConf.to_container(OmegaConf.load(tmp_path / "config.yaml"))):
        node = reread
        for part in key.split("."):
            node = node[part]
        assert node == want and type(node) is type(want)


@pytest.mark.parametrize(
    ("word", "key"),
    [
        ("training.max_steps=many", "training.max_steps"),
        ("training.lr=fast", "training.lr"),
        ("training.resume=maybe", "training.resume"),
        ("training.epochs=1.5", "training.epochs"),
        ("data.train_csv=[1,2]", "data.train_csv"),
        ("training.steps=[a]", "training.steps"),
        ("training.lrr=1", "training.lrr"),
        ("data.feature_norm=sometimes", "data.feature_norm"),
    ],
)
def test_wrong_type_or_key_is_one_line_naming_the_key(word: str, key: str):
    with pytest.raises(ConfigError) as err:
        load_config("train.yaml", [word], validate=False)
    assert key in str(err.value) and "\n" not in str(err.value)


def test_wrong_type_exits_2_with_one_line(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):
    from wavflow.train.__main__ import main

    monkeypatch.delenv("CONFIG_PATH", raising=False)
    assert main(["training.max_steps=many"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "training.max_steps" in err and "many" in err


def test_quote_and_format_override_read_back_exactly():
    for text in ["plain", "a'b", "back\\slash", "ends\\", "ends\\'", "'", "", "run #2, x=1 [y]"]:
        cfg = load_config("train.yaml", [f"training.output_dir={quote(text)}"], validate=False)
        assert cfg.training.output_dir == text
    values = {"data.train_csv": ["/a #1/x.csv", "b,c.csv"], "training.lr": 1e-05, "training.max_steps": None,
              "training.resume": False, "training.experiment_id": "007"}
    cfg = load_config("train.yaml", [format_override(k, v) for k, v in values.items()], validate=False)
    for key, value in values.items():
        got = OmegaConf.select(cfg, key)
        assert (OmegaConf.to_container(got) if OmegaConf.is_config(got) else got) == value


def test_json_mapping_and_plus_on_a_schema_key():
    """Interfaces kept from before Hydra: a JSON object for a mapping key, and +key=value on a key
    the schema already has (it sets it)."""
    arch = {"visual": "tiny", "ast_layers": 1, "dims": [1, 2.5], "none": None, "name": "a b, c"}
    cfg = load_config("evaluate.yaml", ["+architectures.synchformer=" + json.dumps(arch)], validate=False)
    assert OmegaConf.to_container(cfg.architectures.synchformer) == arch and cfg.architectures.imagebind is None
    assert load_config("train.yaml", ["+training.lr=2e-4"], validate=False).training.lr == pytest.approx(2e-4)
    # a mapping's keys are not fixed: +key adds one, as the unknown-key error says to
    bench = load_config("bench_learning.yaml", ["+bench.finetune.ways.full_slow=['training.lr=1.0e-4']"])
    assert list(bench.bench.finetune.ways.full_slow) == ["training.lr=1.0e-4"] and "full" in bench.bench.finetune.ways
    with pytest.raises(ConfigError, match="architectures.imagebind' expects a mapping"):
        load_config("evaluate.yaml", ["architectures.imagebind=[1,2]"], validate=False)


def test_no_hydra_folders_and_cwd_unchanged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    load_config("train.yaml", ["training.experiment_id=x"], validate=False)
    assert Path.cwd() == tmp_path and list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- groups
def test_model_group_brings_its_data_shapes():
    big = load_config("train.yaml", ["model=large_44k"])
    assert (big.model.name, big.data.target_sample_rate, big.data.clip_seq_len, big.data.sync_seq_len) == (
        "large_44k", 44100, 64, 192)
    tiny = load_config("train.yaml", ["model=tiny_16k", "data.audio_duration=2.0"])
    assert (tiny.model.name, tiny.data.clip_seq_len, tiny.data.sync_seq_len) == ("tiny_16k", 16, 40)
    one = load_config("demo.yaml", ["model=tiny_16k"])  # the demo's own 1 s shapes win over the group's
    assert (one.model.name, one.data.clip_seq_len, one.data.sync_seq_len) == ("tiny_16k", 8, 16)
    assert load_config("train.yaml", ["model.name=tiny_16k"]).model.name == "tiny_16k"  # still a plain key
    with pytest.raises(ConfigError, match=r"model=huge: no such option .*large_44k"):
        load_config("train.yaml", ["model=huge"])


def test_encoders_group():
    assert load_config("infer.yaml").encoders.profile == "default"
    tiny = load_config("infer.yaml", ["encoders=tiny"])
    assert tiny.encoders.profile == "tiny" and tiny.encoders.allow_download is True
    assert load_config("demo.yaml").encoders.profile == "tiny"
    assert load_config("demo.yaml", ["encoders=default"]).encoders.profile == "default"


# ---------------------------------------------------------------- reference configs
def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "wavflow.config"]


def test_reference_train_config_is_mapped(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch):
    from wavflow import config_reference

    monkeypatch.setattr(config_reference, "_reported", set())
    caplog.set_level(logging.WARNING, logger="wavflow.config")
    cfg = load_config(REFERENCE / "train.yaml", ["experiment_id=007", "training.lr_schedule_gamma=0.5"], job="train")
    assert cfg.data.train_csv == "data/train.csv" and cfg.training.experiment_id == "007"
    assert cfg.training.steps == [400] and cfg.training.gamma == 0.5 and cfg.training.lr == pytest.approx(1e-4)
    assert cfg.model.empty_string_feat_path is None and cfg.encoders.clip_model == "ViT-H-14-378-quickgelu"
    logged = _warnings(caplog)
    for line in ["reference key data.csv_path -> data.train_csv", "reference key experiment_id -> training.experiment_id",
                 "reference key model.empty_string_ckpt -> model.empty_string_feat_path",
                 "reference key training.lr_schedule_steps -> training.steps",
                 "reference key training.lr_schedule_gamma -> training.gamma",
                 "reference key model.clip_model_name -> encoders.clip_model"]:
        assert logged.count(line) == 1, (line, logged)  # once, though the command line repeats two of them
    ignored = " ".join(m for m in logged if "ignored" in m)
    for key in ["parallelism.*", "comm.train_timeout_seconds", "metrics.*", "checkpoint.enable_checkpoint",
                "checkpoint.folder", "checkpoint.interval", "checkpoint.keep_latest_k", "checkpoint.load_step",
                "checkpoint.export_dtype", "eval.interval_min", "eval.interval_max", "eval.eval_freq",
                "eval.sampling_method", "eval.num_sampling_steps", "training.global_batch_size",
                "model.attn_dropout", "model.proj_dropout", "model.class_num", "training.start_epoch",
                "training.dataloader_pin_memory", "training.dataloader_prefetch_factor", "comm.init_timeout_seconds"]:
        assert f"reference key {key} ignored" in ignored, key
    load_config(REFERENCE / "train.yaml", [], job="train")
    assert len(_warnings(caplog)) == len(logged)  # reported once per process


def test_reference_infer_and_extract_configs_are_mapped(monkeypatch: pytest.MonkeyPatch):
    infer = load_config(REFERENCE / "infer.yaml", ["inference.duration_sec=4.0", "model.clip_pretrained=/w/clip.bin"],
                        job="infer", validate=False)
    assert infer.data.audio_duration == 4.0 and infer.encoders.clip_pretrained == "/w/clip.bin"
    assert infer.model.ckpt_path == "output/test_wavflow/ema_epoch_1000.pth" and infer.inference.cfg == 4.5
    ext = load_config(REFERENCE / "extract_vt2a.yaml", ["extraction.target_sample_rate=44100"], job="extract_vt2a",
                      validate=False)
    assert ext.data.target_sample_rate == 44100 and ext.extraction.save_interval == 16
    assert ext.output.pth_dir == "features/vt2a" and "seed" not in ext.extraction


def test_user_file_chain_unknown_key_names_file(tmp_path: Path):
    (tmp_path / "parent.yaml").write_text("_base_: train.yaml\ntraining:\n  lr: 2e-4\n")
    (tmp_path / "child.yaml").write_text("_base_: parent.yaml\ntraining:\n  epochs: 3\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert (cfg.training.lr, cfg.training.epochs) == (pytest.approx(2e-4), 3)
    (tmp_path / "bad.yaml").write_text("_base_: parent.yaml\ntraining:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'training.epochz' in .*bad.yaml"):
        load_config(tmp_path / "bad.yaml")


def test_prepare_override_rules():
    assert prepare_override("train", "training.experiment_id=007") == "training.experiment_id='007'"
    assert prepare_override("train", "training.lr=3e-4") == "training.lr=3e-4"
    assert prepare_override("train", "model=large_44k") == "model=large_44k"
    assert prepare_override("train", "data.csv_path=x.csv") == "data.train_csv='x.csv'"
    assert prepare_override("train", "parallelism.tensor_parallel_degree=2") is None


# ---------------------------------------------------------------- sweeps
def test_sweep_expansion_and_names():
    from wavflow.train.sweep import expand, run_name

    points = expand(["training.lr=1e-4,3e-4", "training.max_steps=200", "training.batch_size=2,4",
                     "training.output_dir=/data/run #2/out"])
    assert len(points) == 4
    assert points[0].overrides == ["training.lr=0.0001", "training.max_steps=200", "training.batch_size=2",
                                   "training.output_dir=/data/run #2/out"]
    assert points[3].swept == [("training.lr", "0.0003"), ("training.batch_size", "4")]
    assert run_name("exp", points[3].swept) == "exp-lr=0.0003,batch_size=4"
    assert run_name("exp", [("training.lr", "1"), ("bench.lr", "2")]) == "exp-training.lr=1,bench.lr=2"


def test_sweep_is_refused_inside_torchrun(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    from wavflow.train.__main__ import main

    monkeypatch.setenv("LOCAL_RANK", "0")
    assert main(["-m", "training.lr=1e-4,3e-4"]) == 2
    assert "one torchrun per point" in capsys.readouterr().err


@pytest.mark.slow
def test_two_point_sweep_runs_and_prints_its_table(tmp_path: Path):
    from tests.test_train_common import make_dataset, overrides

    csv = make_dataset(tmp_path)
    words = [w for w in overrides(tmp_path, csv) if not w.startswith("training.epochs=")]
    env = dict(os.environ, WAVFLOW_PYTHON=sys.executable, OMP_NUM_THREADS="1", NPROC_PER_NODE="1")
    env.pop("CONFIG_PATH", None)
    proc = subprocess.run(
        ["bash", str(REPO / "scripts/launch/train_single_node.sh"), "-m", "training.lr=1e-4,3e-4",
         "training.max_steps=2", "training.epochs=100", *words],
        env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    table = lines[next(i for i, ln in enumerate(lines) if ln.split()[:2] == ["run", "exit"]):]
    assert table[0].split()[:4] == ["run", "exit", "step", "final"] and len(table) == 4
    for row, lr in zip(table[2:], (1e-4, 3e-4)):
        name, rc, step, loss = row.split()[:4]
        assert (rc, step) == ("0", "2") and float(loss) > 0
        run = tmp_path / "out" / name
        saved = OmegaConf.load(run / "config.yaml")
        assert saved.training.lr == pytest.approx(lr) and saved.training.experiment_id == name
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["exp-lr=0.0001", "exp-lr=0.0003"]
    assert not (tmp_path / "outputs").exists() and not list(tmp_path.rglob(".hydra"))


@pytest.mark.slow
def test_reference_layout_configs_run_through_the_launchers(tmp_path: Path, wavflow_cache_dir: Path):
    """extract -> train -> predict, each launcher given the reference's own YAML file unchanged
    (`--config tests/data/reference_configs/<job>.yaml`); the command lines use reference keys
    too, plus what makes the run CPU-sized (tiny encoders and network, 2 s clips)."""
    from tests.test_extract import write_dataset

    ds = write_dataset(tmp_path / "src", videos=True, n=3)
    env = dict(os.environ, WAVFLOW_PYTHON=sys.executable, OMP_NUM_THREADS="1", NPROC_PER_NODE="1",
               WAVFLOW_CACHE_DIR=str(wavflow_cache_dir))
    env.pop("CONFIG_PATH", None)
    small = ["encoders.profile=tiny", "data.clip_seq_len=16", "data.sync_seq_len=40"]

    def launch(script: str, config: str, *words: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(["bash", str(REPO / "scripts/launch" / script), "--config", str(REFERENCE / config), *words],
                              env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
        assert proc.returncode in (0, 1), proc.stdout[-2000:] + proc.stderr[-4000:]  # 1: the missing-audio row
        return proc

    feats = tmp_path / "feats"
    proc = launch("extract_vt2a.sh", "extract_vt2a.yaml", *small, f"data.csv_path={ds['csv']}",
                  f"data.data_root={ds['data']}", f"output.pth_dir={feats}", f"output.csv_path={feats / 'train.csv'}",
                  "extraction.duration_sec=2", "extraction.target_sample_rate=16000", "extraction.num_workers=0")
    assert "reference key extraction.target_sample_rate -> data.target_sample_rate" in proc.stderr
    assert "reference key extraction.seed ignored" in proc.stderr
    assert len((feats / "train.csv").read_text().splitlines()) == 4  # header + 3 clips

    proc = launch("train_single_node.sh", "train.yaml", *small, "model.name=tiny_16k", "data.audio_duration=2.0",
                  f"data.csv_path={feats / 'train.csv'}", "experiment_id=ref run #1", f"training.output_dir={tmp_path / 'out'}",
                  "training.max_steps=2", "training.num_workers=0", "training.device=cpu", "training.tensorboard=false",
                  "training.gen_train_freq=0", "training.warmup_steps=1")
    run = tmp_path / "out" / "ref run #1"
    saved = OmegaConf.load(run / "config.yaml")
    assert saved.training.experiment_id == "ref run #1" and saved.data.train_csv == str(feats / "train.csv")
    assert "GlobalStep 2" in (run / "training.log").read_text()
    assert proc.stderr.count("reference key data.csv_path -> data.train_csv") == 1

    csv = tmp_path / "infer.csv"
    csv.write_text('id,video_path,caption,video_exist,text_exist\nt,,"a dog, barking",0,1\n')
    proc = launch("predict.sh", "infer.yaml", *small, "model.name=tiny_16k", "inference.duration_sec=2.0",
                  f"model.ckpt_path={run}", "model.use_ema=false", f"data.csv_path={csv}", "sampling.num_steps=2",
                  f"output.output_dir={tmp_path / 'gen'}")
    assert "reference key inference.duration_sec -> data.audio_duration" in proc.stderr
    assert (tmp_path / "gen" / "t.wav").is_file()


@pytest.mark.slow
def test_installed_wheel_finds_its_configs_from_any_directory(tmp_path: Path):
    """`pip install .` (not editable) into a fresh venv layered on this one's site-packages:
    the console scripts run from an unrelated directory and read the packaged configs."""
    venv = tmp_path / "venv"
    # no pip of its own (ensurepip would bring an old setuptools): this env's pip and setuptools serve
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    # this environment's packages (torch, hydra, setuptools, ...) as a plain path after the new
    # venv's own site-packages: the installed wavflow comes first, and no editable finder is loaded
    import sysconfig

    (site / "_parent_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # copy the sources first: building in place would leave build/ and *.egg-info in the checkout
    src = tmp_path / "src"
    src.mkdir()
    import shutil

    for name in ["pyproject.toml", "setup.py", "README.md", "LICENSE", "wavflow", "configs"]:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(REPO / name, src / name)
    pip = subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "--ignore-installed", str(src)],
                         capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stdout[-2000:] + pip.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CONFIG_PATH")}
    where = subprocess.run([str(py), "-c", "import wavflow.config as c; print(c.CONFIG_DIR)"], cwd=elsewhere, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where) == site / "wavflow" / "configs"
    assert (Path(where) / "model" / "large_44k.yaml").is_file() and (Path(where) / "encoders" / "tiny.yaml").is_file()
    for script in ["wavflow-train", "wavflow-predict", "wavflow-extract", "wavflow-demo"]:
        proc = subprocess.run([str(venv / "bin" / script), "model=large_44k", "no.such.key=1"], cwd=elsewhere, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and "no.such.key" in proc.stdout + proc.stderr, (script, proc.stderr[-2000:])
    ok = subprocess.run([str(py), "-c", "from wavflow.config import load_config as l; c = l('train.yaml', ['model=large_44k']);"
                         "print(c.data.target_sample_rate)"], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert ok.stdout.strip() == "44100", ok.stderr[-2000:]
    assert sorted(p.name for p in elsewhere.iterdir()) == []


def test_multi_node_launcher_refuses_sweeps(tmp_path: Path):
    proc = subprocess.run(["bash", str(REPO / "scripts/launch/train_multi_node.sh"), "-m", "training.lr=1e-4,3e-4"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path,
                          env=dict(os.environ, NNODES="2", NODE_RANK="0", MASTER_ADDR="localhost"))
    assert proc.returncode == 2 and "sweeps run on one node" in proc.stderr
