"""training.strategy=fsdp (wavflow/train/fsdp.py): PyTorch FSDP2 on two gloo ranks trains like DDP,
writes whole reference-layout checkpoints, and any strategy resumes from any other."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_train_common import make_dataset, overrides
from wavflow.io_utils import safe_torch_load

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "scripts" / "launch"


def _train(tmp_path: Path, csv: Path, nproc: int, exp: str, **extra: object) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "NNODES", "NODE_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", WAVFLOW_PYTHON=sys.executable, NPROC_PER_NODE=str(nproc))
    args = overrides(tmp_path, csv, training__experiment_id=exp, training__seed=3, **extra)
    return subprocess.run(["bash", str(LAUNCH / "train_single_node.sh"), "--config", str(ROOT / "configs/train.yaml"),
                           *args], env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)


def _losses(log: str) -> list[float]:
    return [float(v) for v in re.findall(r"GlobalStep \d+ Loss: ([\d.]+)", log)]


@pytest.mark.slow
def test_fsdp_trains_like_ddp_and_its_checkpoint_resumes_under_ddp(tmp_path: Path):
    from wavflow.features.report import main as report

    csv = make_dataset(tmp_path, modes=("vt2a", "t2a", "v2a", "vt2a") * 2)
    # feature statistics: the network carries frozen normalisation parameters (a float64 tag among them)
    assert report(["--csv", str(csv), "--write-stats", "--encoder-identity", "tiny-v3"]) == 0
    common = dict(training__epochs=2, training__batch_size=2, training__grad_accum_steps=2,
                  training__gen_train_freq=2, training__ema_warmup=True, data__feature_norm=True)
    ddp = _train(tmp_path, csv, 2, "ddp", **common)
    assert ddp.returncode == 0, ddp.stderr[-4000:]
    fsdp = _train(tmp_path, csv, 2, "fsdp", training__strategy="fsdp", training__gradient_checkpointing=True, **common)
    assert fsdp.returncode == 0, fsdp.stderr[-4000:]
    out = tmp_path / "out"
    ddp_log, fsdp_log = ((out / e / "training.log").read_text() for e in ("ddp", "fsdp"))
    # the same rows, noise and weights: the same losses to float rounding (reduce-scatter vs all-reduce order)
    assert len(_losses(fsdp_log)) == len(_losses(ddp_log)) == 2
    assert _losses(fsdp_log) == pytest.approx(_losses(ddp_log), rel=1e-4)
    assert "Weights identical on all 2 rank(s)" in fsdp_log and "Feature normalisation: on" in fsdp_log

    a, b = (safe_torch_load(out / e / "checkpoint_latest.pth") for e in ("ddp", "fsdp"))
    assert set(b["model"]) == set(a["model"]) and not any(k.startswith(("module.", "_fsdp")) for k in b["model"])
    for part in ("model", "model_ema1", "model_ema2"):
        for name, value in a[part].items():
            assert type(b[part][name]) is torch.Tensor, (part, name)  # whole tensors, not shards
            assert b[part][name].shape == value.shape
            torch.testing.assert_close(b[part][name], value, rtol=1e-4, atol=1e-5)
    assert set(b["optimizer"]["state"]) == set(a["optimizer"]["state"])
    for i, st in a["optimizer"]["state"].items():
        for k in ("exp_avg", "exp_avg_sq"):
            assert type(b["optimizer"]["state"][i][k]) is torch.Tensor
            torch.testing.assert_close(b["optimizer"]["state"][i][k], st[k], rtol=1e-3, atol=1e-8)
    assert (b["global_step"], b["world_size"]) == (a["global_step"], 2)
    samples = sorted(p.name.split("_id_")[0] for p in (out / "fsdp" / "samples" / "epoch_2").glob("*.wav"))
    assert samples == ["gen_rank0", "gen_rank1", "gt_rank0", "gt_rank1"]

    # FSDP on 2 ranks -> DDP on 1 rank: resumes to the next epoch from the sharded run's file
    resumed = _train(tmp_path, csv, 1, "fsdp", training__epochs=3, training__batch_size=2,
                     training__grad_accum_steps=2, training__gen_train_freq=0)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    log = (out / "fsdp" / "training.log").read_text()
    assert "Resumed from" in log and "Epoch [3/3]" in log
    assert safe_torch_load(out / "fsdp" / "checkpoint_latest.pth")["epoch"] == 3

    # DDP -> FSDP: the DDP run's file starts a sharded run that trains on from it
    again = _train(tmp_path, csv, 2, "ddp", training__strategy="fsdp", **{**common, "training__epochs": 3})
    assert again.returncode == 0, again.stderr[-4000:]
    assert safe_torch_load(out / "ddp" / "checkpoint_latest.pth")["epoch"] == 3


def test_strategy_settings_are_checked_before_anything_runs():
    from omegaconf import OmegaConf

    from wavflow.errors import ConfigError
    from wavflow.train.fsdp import check_strategy

    base = {"strategy": "fsdp", "compile": False, "fsdp": {"param_dtype": None, "reduce_dtype": None}}
    assert check_strategy(OmegaConf.create(base)) == "fsdp"
    with pytest.raises(ConfigError, match="training.strategy must be one of"):
        check_strategy(OmegaConf.create({**base, "strategy": "zero3"}))
    with pytest.raises(ConfigError, match="training.compile=true with training.strategy=fsdp"):
        check_strategy(OmegaConf.create({**base, "compile": True}))
    with pytest.raises(ConfigError, match="training.fsdp.param_dtype must be null or one of"):
        check_strategy(OmegaConf.create({**base, "fsdp": {"param_dtype": "bf16"}}))


@pytest.mark.slow
def test_lora_and_frozen_layers_fine_tune_under_fsdp(tmp_path: Path):
    """A LoRA run on two sharded ranks: the base stays as loaded, the adapter file holds whole
    adapters, and the merge command gives a checkpoint predict loads."""
    csv = make_dataset(tmp_path)
    base = _train(tmp_path, csv, 1, "base", training__epochs=1)
    assert base.returncode == 0, base.stderr[-4000:]
    start = tmp_path / "out" / "base" / "checkpoint_latest.pth"
    lora = _train(tmp_path, csv, 2, "lora", training__epochs=2, training__strategy="fsdp",
                  training__init_from=str(start), training__lora__rank=2, training__lora__alpha=4.0)
    assert lora.returncode == 0, lora.stderr[-4000:]
    run = tmp_path / "out" / "lora"
    ckpt, first = safe_torch_load(run / "checkpoint_latest.pth"), safe_torch_load(start)
    frozen = [k for k in first["model"] if not k.startswith("lora.")]
    assert frozen and all(torch.equal(ckpt["model"][k], first["model"][k]) for k in frozen)
    adapter = safe_torch_load(run / "adapter_checkpoint_latest.pth")
    b_weights = [v for k, v in adapter["adapter"].items() if k.endswith(".B")]
    assert b_weights and all(type(v) is torch.Tensor for v in b_weights)
    assert any(v.abs().sum() > 0 for v in b_weights)  # the adapters trained (B starts at zero)
    for k, v in adapter["adapter"].items():
        assert v.shape == ckpt["model"][k].shape, k  # whole, not one rank's shard
    merged = tmp_path / "merged.pth"
    proc = subprocess.run([sys.executable, "-m", "wavflow.train.lora_merge", "--adapter",
                           str(run / "adapter_checkpoint_latest.pth"), "--out", str(merged)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not any(k.startswith("lora.") for k in safe_torch_load(merged)["model"])


@pytest.mark.slow
def test_fsdp_mixed_precision_policy_trains_in_bf16_and_keeps_fp32_weights(tmp_path: Path):
    """training.fsdp.param_dtype=bfloat16 / reduce_dtype=float32: the step computes with bf16 weights
    (its update differs from fp32's, its loss only by rounding), the shards and checkpoints stay fp32."""
    csv = make_dataset(tmp_path)
    fp32 = _train(tmp_path, csv, 2, "fp32", training__strategy="fsdp", training__epochs=1)
    assert fp32.returncode == 0, fp32.stderr[-4000:]
    bf16 = _train(tmp_path, csv, 2, "bf16", training__strategy="fsdp", training__epochs=1,
                  training__fsdp__param_dtype="bfloat16", training__fsdp__reduce_dtype="float32")
    assert bf16.returncode == 0, bf16.stderr[-4000:]
    out = tmp_path / "out"
    a, b = (_losses((out / e / "training.log").read_text()) for e in ("fp32", "bf16"))
    assert len(a) == len(b) >= 1 and b == pytest.approx(a, rel=5e-2)
    ckpt, ref = (safe_torch_load(out / e / "checkpoint_latest.pth")["model"] for e in ("bf16", "fp32"))
    assert all(v.dtype == torch.float32 for v in ckpt.values())
    assert max(float((ckpt[k] - ref[k]).abs().max()) for k in ref) > 0  # bf16 gradients: another update
