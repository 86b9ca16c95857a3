"""Merge a LoRA run's adapters into its base weights: a plain checkpoint that predict, the web
page and evaluation load like any other (TRAINING.md "Fine-tuning").

    python -m wavflow.train.lora_merge --adapter RUN/adapter_checkpoint_latest.pth --out merged.pth
        [--base BASE.pth] [--raw]

The base is the file the run started from (`training.init_from`), as recorded in the adapter
file, or --base where it has moved; its SHA-256 must equal the recorded one. The merged network
is base + (alpha / rank) * B @ A per adapted layer, with the parameters `training.trainable`
trained beside the adapters written over the base's, all from EMA-1 weights (what prediction
uses) unless --raw; it is written as the network and both EMAs of a checkpoint that carries the
run's config.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from wavflow.errors import CheckpointError
from wavflow.exit_codes import EXIT_OK, JobArgumentParser, run_job
from wavflow.io_utils import atomic_torch_save, safe_torch_load
from wavflow.train.checkpointing import CHECKPOINT_FORMAT, load_initial_checkpoint
from wavflow.train.finetune import file_sha256, initial_weights
from wavflow.train.lora import ADAPTER_FORMAT, LoRASettings, merge_state


def load_adapter(path: Path) -> dict[str, Any]:
    adapter = safe_torch_load(path, what="LoRA adapter file")
    if not isinstance(adapter, Mapping) or adapter.get("format") != ADAPTER_FORMAT:
        raise CheckpointError(f"{path} is not a WavFlow adapter file (format {ADAPTER_FORMAT})")
    return dict(adapter)


def base_weights(adapter: Mapping[str, Any], base: Optional[Path], *, where: str) -> dict[str, Any]:
    """The base state dict the adapters were trained on, checked against the recorded hash."""
    record = adapter.get("base") or {}
    if not record.get("sha256"):
        raise CheckpointError(f"{where} records no base (training.init_from) to merge into")
    path = Path(base) if base is not None else Path(record["path"])
    if not path.is_file():
        raise CheckpointError(f"the base {path} of {where} does not exist: pass --base where it is now")
    digest = file_sha256(path)
    if digest != record["sha256"]:
        raise CheckpointError(
            f"{path} (SHA-256 {digest}) is not the base {where} was trained on (SHA-256 {record['sha256']})"
        )
    weights, _ = initial_weights(load_initial_checkpoint(path, key="--base"),
                                 use_ema=record.get("weights") == "model_ema1", source=str(path))
    return weights


def merged_checkpoint(adapter: Mapping[str, Any], base: Mapping[str, Any], *, use_ema: bool) -> dict[str, Any]:
    settings = LoRASettings.from_dict(adapter["lora"])
    weights = merge_state(base, adapter["adapter_ema1" if use_ema else "adapter"], settings)
    return {
        "model": weights, "model_ema1": weights, "model_ema2": weights,
        "epoch": int(adapter.get("epoch", 0)), "global_step": int(adapter.get("global_step", 0)),
        "config": _without_lora(str(adapter.get("config", ""))),
        "format": CHECKPOINT_FORMAT,
        "merged_from": {"base": dict(adapter["base"]), "lora": dict(adapter["lora"]),
                        "adapter_weights": "ema1" if use_ema else "raw"},
    }


def _without_lora(config_yaml: str) -> str:
    """The run's config with its adapters switched off: the merged network has none."""
    if not config_yaml:
        return config_yaml
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(config_yaml)
    if OmegaConf.select(cfg, "training.lora") is not None:
        cfg.training.lora.rank = None
    return OmegaConf.to_yaml(cfg)


def _merge(argv: Sequence[str]) -> int:
    parser = JobArgumentParser(prog="python -m wavflow.train.lora_merge", description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", type=Path, required=True, help="adapter_checkpoint_*.pth of a LoRA run")
    parser.add_argument("--out", type=Path, required=True, help="where to write the merged checkpoint")
    parser.add_argument("--base", type=Path, default=None, help="the base checkpoint, if it moved since training")
    parser.add_argument("--raw", action="store_true", help="merge the raw adapters, not their EMA-1")
    args = parser.parse_args(argv)
    adapter = load_adapter(args.adapter)
    base = base_weights(adapter, args.base, where=str(args.adapter))
    path = atomic_torch_save(merged_checkpoint(adapter, base, use_ema=not args.raw), args.out)
    print(f"[wavflow.lora_merge] wrote {path}: {len(adapter['adapter'])} adapter tensors merged into the base")
    return EXIT_OK


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_job("lora_merge", lambda: _merge(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
