"""Fine-tuning: training.init_from (a new run from another run's weights) and
training.trainable (only part of the network trains). TRAINING.md "Fine-tuning"."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import yaml

from tests.test_train_common import make_config, make_dataset
from wavflow.errors import CheckpointError, ConfigError
from wavflow.io_utils import safe_torch_load
from wavflow.train.trainer import Trainer, run_training

HEAD = ["final_layer.*", "fused_blocks.1.*"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> tuple[Path, Path]:
    """(training CSV, a finished 2-step run's folder) to start from."""
    root = tmp_path_factory.mktemp("pretrained")
    csv = make_dataset(root)
    run = run_training(make_config(root / "a", csv, training__epochs=1, training__ema_checkpoint_save_epoch=1,
                                   training__ema_warmup=True))
    return csv, run.exp_dir


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("use_ema", [False, True])
def test_init_from_starts_a_new_run_at_step_0_with_the_loaded_weights(tmp_path, pretrained, use_ema):
    csv, run = pretrained
    source = run / "checkpoint_latest.pth"
    ckpt = safe_torch_load(source)
    want = ckpt["model_ema1" if use_ema else "model"]
    tr = Trainer(make_config(tmp_path, csv, training__init_from=str(source), training__init_from_ema=use_ema))
    assert (tr.epoch, tr.global_step) == (0, 0)
    assert not tr.optimizer.state  # fresh AdamW: no moments yet
    for name, p in tr.model.named_parameters():
        assert torch.equal(p.detach(), want[name]), name
        assert torch.equal(tr.ema1.state_dict()[name], want[name]) and torch.equal(tr.ema2.state_dict()[name], want[name])
    assert not torch.equal(ckpt["model"]["final_layer.conv.weight"], ckpt["model_ema1"]["final_layer.conv.weight"])
    assert tr.cfg.training.init_from_sha256 == _sha256(source)


def test_init_from_is_recorded_in_config_and_checkpoints_and_kept_on_resume(tmp_path, pretrained):
    csv, run = pretrained
    source = run / "ema_epoch_1.pth"  # a flat EMA state dict
    digest = _sha256(source)
    common = dict(training__init_from=str(source), training__epochs=2)
    part = run_training(make_config(tmp_path, csv, training__max_steps=1, **common))
    saved = yaml.safe_load((part.exp_dir / "config.yaml").read_text())
    assert saved["training"]["init_from_sha256"] == digest
    first = safe_torch_load(part.exp_dir / "checkpoint_latest.pth")
    assert first["init_from"] == {"path": str(source), "sha256": digest, "weights": "flat"}
    assert f"init_from_sha256: {digest}" in first["config"]
    rest = run_training(make_config(tmp_path, csv, **common))
    assert rest.global_step == 4
    last = safe_torch_load(rest.exp_dir / "checkpoint_latest.pth")
    assert last["init_from"] == first["init_from"] and f"init_from_sha256: {digest}" in last["config"]
    assert yaml.safe_load((rest.exp_dir / "config.yaml").read_text())["training"]["init_from_sha256"] == digest
    assert "Resumed from" in (rest.exp_dir / "training.log").read_text()
    with pytest.raises(CheckpointError, match="init_from_sha256 pins abc"):  # a pin is checked on resume too
        Trainer(make_config(tmp_path, csv, training__init_from_sha256="abc", **common))


@pytest.mark.parametrize("way", [dict(training__trainable=HEAD), dict(training__lora__rank=2, training__lora__dropout=0.1)])
def test_a_fine_tuning_run_resumes_bit_identically(tmp_path, pretrained, way):
    csv, run = pretrained
    common = dict(training__init_from=str(run), training__epochs=2, training__weight_decay=0.1,
                  training__ema_warmup=True, **way)
    full = run_training(make_config(tmp_path / "full", csv, **common))
    run_training(make_config(tmp_path / "part", csv, training__max_steps=3, **common))
    rest = run_training(make_config(tmp_path / "part", csv, **common))
    a = safe_torch_load(full.exp_dir / "checkpoint_latest.pth")
    b = safe_torch_load(rest.exp_dir / "checkpoint_latest.pth")
    assert a["global_step"] == b["global_step"] == 4
    for key in ("model", "model_ema1", "model_ema2"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name}"
    if "training__lora__rank" in way:
        assert any(k.startswith("lora.") for k in a["model"])
        adapter_a = safe_torch_load(full.exp_dir / "adapter_checkpoint_latest.pth")["adapter"]
        adapter_b = safe_torch_load(rest.exp_dir / "adapter_checkpoint_latest.pth")["adapter"]
        assert all(torch.equal(adapter_a[k], adapter_b[k]) for k in adapter_a)


def test_frozen_parameters_stay_bit_identical_and_out_of_adamw_and_the_ema(tmp_path, pretrained):
    csv, run = pretrained
    start = safe_torch_load(run / "checkpoint_latest.pth")["model"]
    # weight decay would move a frozen parameter that AdamW still held
    tr = Trainer(make_config(tmp_path, csv, training__init_from=str(run), training__trainable=HEAD,
                             training__weight_decay=0.5, training__lr=1e-2, training__epochs=2))
    trained = {n for n, p in tr.model.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith(("final_layer.", "fused_blocks.1.")) for n in trained)
    in_adamw = {id(p) for group in tr.optimizer.param_groups for p in group["params"]}
    assert in_adamw == {id(p) for n, p in tr.model.named_parameters() if n in trained}
    assert tr.trainable_params == sum(p.numel() for n, p in tr.model.named_parameters() if n in trained)
    tr.train()
    assert tr.global_step == 4
    ckpt = safe_torch_load(tr.exp_dir / "checkpoint_latest.pth")
    assert len(ckpt["optimizer"]["state"]) == len(trained)
    moved = set()
    for name, value in ckpt["model"].items():
        if name not in start:
            continue
        if name in trained:
            moved |= {name} if not torch.equal(value, start[name]) else set()
        else:
            assert torch.equal(value, start[name]), f"frozen {name} changed"
            assert torch.equal(ckpt["model_ema1"][name], start[name]), f"EMA of frozen {name} changed"
    assert moved  # the trained part did train
    log = (tr.exp_dir / "training.log").read_text()
    assert f"Number of trainable parameters: {tr.trainable_params / 1e6:.6f}M of" in log


@pytest.mark.parametrize("patterns,message", [
    (["final_layer.*", "no_such_block.*"], "'no_such_block.*' match no parameter"),
    (["cond_norm.*"], "match no parameter"),  # this run normalises no features: there is no cond_norm
])
def test_trainable_patterns_that_match_nothing_are_config_errors(tmp_path, pretrained, patterns, message):
    csv, _ = pretrained
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("*", r"\*")):
        Trainer(make_config(tmp_path, csv, training__trainable=patterns))


def test_init_from_refuses_a_changed_file_a_wrong_shape_and_two_starting_points(tmp_path, pretrained):
    csv, run = pretrained
    source = run / "checkpoint_latest.pth"
    with pytest.raises(CheckpointError, match="init_from_sha256 pins 0123"):
        Trainer(make_config(tmp_path / "a", csv, training__init_from=str(source), training__init_from_sha256="0123"))
    weights = dict(safe_torch_load(source)["model"])
    weights["final_layer.conv.weight"] = weights["final_layer.conv.weight"][:, :-1]
    bad = tmp_path / "bad.pth"
    torch.save(weights, bad)
    with pytest.raises(CheckpointError, match=r"does not fit model preset 'tiny_16k'.*final_layer\.conv\.weight"):
        Trainer(make_config(tmp_path / "b", csv, training__init_from=str(bad)))
    with pytest.raises(ConfigError, match="both name starting weights"):
        Trainer(make_config(tmp_path / "c", csv, training__init_from=str(source),
                            checkpoint__initial_load_path=str(source)))
    with pytest.raises(CheckpointError, match="is a flat state dict with no separate EMA weights"):
        Trainer(make_config(tmp_path / "e", csv, training__init_from=str(run / "ema_epoch_1.pth"),
                            training__init_from_ema=True))
    with pytest.raises(CheckpointError, match="training.init_from .* does not exist"):
        Trainer(make_config(tmp_path / "d", csv, training__init_from=str(tmp_path / "missing.pth")))


# ----------------------------------------------------------------------------------- LoRA
def _network_and_inputs(tmp_path):
    from wavflow.model import build_model_from_config
    from wavflow.shapes import FeatureShapes

    cfg = make_config(tmp_path, tmp_path / "unused.csv")
    torch.manual_seed(0)
    model = build_model_from_config(cfg).eval()
    with torch.no_grad():  # a fresh network's zero-initialised output layers would hide every change
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    shapes = FeatureShapes.of_model(model)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, model.latent_seq_len, model.latent_dim, generator=g)
    feats = [torch.randn(2, *s, generator=g) for s in (shapes.clip, shapes.sync, shapes.text)]
    return cfg, model, (x, *feats, torch.tensor([0.3, 0.8]))


def test_lora_merge_equals_the_adapted_network(tmp_path):
    from wavflow.model import build_model_from_config
    from wavflow.model.checkpoint import load_weights
    from wavflow.train.lora import LoRASettings, add_adapters, adapter_state, merge_state

    cfg, model, inputs = _network_and_inputs(tmp_path)
    with torch.no_grad():
        base_out = model(*inputs)
        base_state = {k: v.clone() for k, v in model.state_dict().items()}
    settings = LoRASettings(rank=2, alpha=6.0, dropout=0.0, targets=("*attn.qkv", "*linear1", "*ffn.w2"))
    n = add_adapters(model, settings)
    assert 0 < n < 0.05 * sum(p.numel() for k, p in base_state.items())
    with torch.no_grad():
        assert torch.equal(model(*inputs), base_out)  # B starts at zero: the adapted network is its base
        for name, p in model.lora.named_parameters():
            if name.endswith(".B"):
                p.normal_(0.0, 0.05)
        adapted = model(*inputs)
    assert (adapted - base_out).abs().max() > 1e-3
    assert all(torch.equal(v, base_state[k]) for k, v in model.state_dict().items() if k in base_state)
    merged = merge_state(model.state_dict(), adapter_state(model.state_dict()), settings)
    assert not any(k.startswith("lora.") for k in merged)
    plain = build_model_from_config(cfg).eval()
    load_weights(plain, merged)
    with torch.no_grad():
        torch.testing.assert_close(plain(*inputs), adapted, atol=1e-5, rtol=0)


def test_lora_settings_are_checked(tmp_path, pretrained):
    csv, run = pretrained
    with pytest.raises(ConfigError, match="needs|set training.init_from"):
        Trainer(make_config(tmp_path / "a", csv, training__lora__rank=2))
    with pytest.raises(ConfigError, match="'nowhere.\\*' match no Linear or Conv1d layer"):
        Trainer(make_config(tmp_path / "b", csv, training__init_from=str(run), training__lora__rank=2,
                            training__lora__targets=["*attn.qkv", "nowhere.*"]))
    with pytest.raises(ConfigError, match="training.lora.rank must be a whole number"):
        Trainer(make_config(tmp_path / "c", csv, training__init_from=str(run), training__lora__rank=-1))


def test_a_lora_run_trains_only_its_adapters_and_merges_into_a_plain_checkpoint(tmp_path, pretrained, capsys):
    from wavflow.generator import WavFlowGenerator
    from wavflow.train.lora import LoRASettings, merge_state
    from wavflow.train.lora_merge import main as merge_main

    csv, run = pretrained
    source = run / "checkpoint_latest.pth"
    start = safe_torch_load(source)["model_ema1"]
    tr = Trainer(make_config(tmp_path, csv, training__init_from=str(source), training__init_from_ema=True,
                             training__lora__rank=2, training__lora__alpha=4, training__weight_decay=0.5,
                             training__lr=1e-2, training__epochs=1, training__trainable=["final_layer.conv.*"]))
    lora_params = {n for n, _ in tr.model.named_parameters() if n.startswith("lora.")}
    trained = {n for n, p in tr.model.named_parameters() if p.requires_grad}
    assert trained == lora_params | {"final_layer.conv.weight", "final_layer.conv.bias"}
    assert tr.trainable_params <= 0.05 * tr.total_params
    tr.train()
    ckpt = safe_torch_load(tr.exp_dir / "checkpoint_latest.pth")
    for name, value in start.items():
        if not name.startswith("final_layer.conv."):
            assert torch.equal(ckpt["model"][name], value), f"frozen {name} changed"
    assert not torch.equal(ckpt["model"]["final_layer.conv.weight"], start["final_layer.conv.weight"])
    assert len(ckpt["optimizer"]["state"]) == len(trained)

    adapter_path = tr.exp_dir / "adapter_checkpoint_latest.pth"
    adapter = safe_torch_load(adapter_path)
    assert set(adapter["adapter"]) == set(adapter["adapter_ema1"]) == trained  # adapters + final_layer.conv
    assert adapter["base"] == {"path": str(source), "sha256": _sha256(source), "weights": "model_ema1"}
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in adapter["adapter"].items() if k.endswith(".B"))

    out = tmp_path / "merged.pth"
    assert merge_main(["--adapter", str(adapter_path), "--out", str(out)]) == 0
    merged = safe_torch_load(out)
    want = merge_state(start, adapter["adapter_ema1"], LoRASettings.from_dict(adapter["lora"]))
    assert set(merged["model_ema1"]) == set(want)
    for name in want:
        assert torch.equal(merged["model_ema1"][name], want[name]), name
    qkv = "fused_blocks.0.attn.qkv.weight"
    assert not torch.equal(merged["model_ema1"][qkv], start[qkv])
    for name in ("final_layer.conv.weight", "final_layer.conv.bias"):  # trained beside the adapters: kept
        assert torch.equal(merged["model_ema1"][name], ckpt["model_ema1"][name])
        assert not torch.equal(merged["model_ema1"][name], start[name])
    gen = WavFlowGenerator.from_checkpoint(out, device="cpu")  # loads like any checkpoint (strict)
    with pytest.raises(CheckpointError, match="holds LoRA adapters .*python -m wavflow.train.lora_merge"):
        WavFlowGenerator.from_checkpoint(tr.exp_dir / "checkpoint_latest.pth", device="cpu")
    assert torch.equal(gen.model.state_dict()[qkv], want[qkv])

    # the adapters onto another base: refused by the recorded hash
    other = run / "ema_epoch_1.pth"
    assert merge_main(["--adapter", str(adapter_path), "--out", str(tmp_path / "x.pth"), "--base", str(other)]) == 3
    assert "is not the base" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "x.pth").exists()


@pytest.mark.slow
def test_lora_and_a_frozen_network_train_under_ddp_on_two_ranks(tmp_path, pretrained):
    """Two gloo ranks through the launcher: adapters all-reduced (ranks agree), the base untouched."""
    import os
    import subprocess
    import sys

    from tests.test_train_common import overrides

    csv, run = pretrained
    root = Path(__file__).resolve().parent.parent
    args = overrides(tmp_path, csv, training__init_from=str(run), training__lora__rank=2, training__epochs=1)
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "NNODES", "NODE_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", WAVFLOW_PYTHON=sys.executable, NPROC_PER_NODE="2")
    proc = subprocess.run(["bash", str(root / "scripts" / "launch" / "train_single_node.sh"), *args],
                          env=env, capture_output=True, text=True, timeout=400, cwd=root)
    assert proc.returncode == 0, proc.stderr[-4000:]
    exp = tmp_path / "out" / "exp"
    log = (exp / "training.log").read_text()
    assert "Weights identical on all 2 rank(s)" in log
    ckpt = safe_torch_load(exp / "checkpoint_latest.pth")
    start = safe_torch_load(run / "checkpoint_latest.pth")["model"]
    assert ckpt["world_size"] == 2 and ckpt["global_step"] == 1
    assert all(torch.equal(ckpt["model"][k], v) for k, v in start.items())
    assert any(k.endswith(".B") and v.abs().sum() > 0 for k, v in ckpt["model"].items())
    assert (exp / "adapter_checkpoint_latest.pth").is_file()
