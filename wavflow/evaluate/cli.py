"""The evaluation job: arguments, config, networks, pairing, metrics.json and the table."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from wavflow.audio import load_audio
from wavflow.config import load_config
from wavflow.errors import ConfigError, RowsFailedError, WavFlowError, WeightsError
from wavflow.evaluate import models as MD
from wavflow.evaluate.pairing import pair_by_id
from wavflow.evaluate.run import (
    ALL_METRICS,
    compute_report,
    extract_all,
    Extractor,
    format_table,
    METRIC_NETWORK,
    to_json,
)
from wavflow.exit_codes import JobArgumentParser, run_job
from wavflow.features.synchformer import SynchformerConfig
from wavflow.features.synchformer_av import load_synchformer_av, SynchformerAVConfig
from wavflow.io_utils import atomic_write_text
from wavflow.runtime import resolve_device

log = logging.getLogger("wavflow.evaluate")

DEFAULT_CONFIG = "evaluate.yaml"
# WavFlow-M-16k on the VGGSound test set, as published (repeated in metrics.json for comparison;
# the paper names a single KL and IS: compare with KL_PaSST / KL_PANNs and IS_PANNs).
PAPER_WAVFLOW_M_16K = {"FD_PaSST": 62.64, "KL": 1.68, "IS": 17.24, "IB_score": 0.30, "DeSync": 0.47}


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = JobArgumentParser(prog="python -m wavflow.evaluate", description=__doc__)
    parser.add_argument("--generated", required=True, help="folder of generated wavs (a predict output)")
    parser.add_argument("--reference", required=True, help="CSV id,audio_path[,video_path][,caption]")
    parser.add_argument("--infer-csv", default=None, help="the inference CSV (video_exist/text_exist give the modes)")
    parser.add_argument("--out", default=None, help="output folder of metrics.json (evaluation.output_dir)")
    parser.add_argument("--config", default=None, help=f"config file (default configs/{DEFAULT_CONFIG})")
    args, rest = parser.parse_known_args(list(argv))
    bad = [a for a in rest if a.startswith("-") or "=" not in a]
    if bad:
        parser.error(f"unexpected argument(s) {' '.join(bad)}: overrides are key=value")
    return args, rest


def load_eval_config(config: str | None, overrides: Sequence[str]) -> DictConfig:
    cfg = load_config(config or DEFAULT_CONFIG, overrides, validate=False, job="evaluate")
    unknown = [m for m in cfg.metrics.enabled if m not in _metric_names()]
    if unknown:
        raise ConfigError(f"metrics.enabled: unknown metric(s) {', '.join(unknown)} (known: {', '.join(_metric_names())})")
    if not cfg.data.audio_duration > 0:
        raise ConfigError(f"data.audio_duration must be > 0, got {cfg.data.audio_duration}")
    if cfg.metrics.is_splits < 1 or cfg.metrics.desync_segments < 1:
        raise ConfigError("metrics.is_splits and metrics.desync_segments must be >= 1")
    return cfg


def _metric_names() -> tuple[str, ...]:
    return ALL_METRICS


def _synchformer_config(arch: Mapping[str, Any] | None):
    if not arch:
        return None
    args = dict(arch)
    visual = args.pop("visual", "default")
    visual_cfg = SynchformerConfig.tiny() if visual == "tiny" else SynchformerConfig.default()
    try:
        return SynchformerAVConfig(visual=visual_cfg, **args)
    except TypeError as exc:
        raise ConfigError(f"architectures.synchformer: {exc}") from exc


def load_networks(cfg: DictConfig, needed: set[str], device: torch.device) -> tuple[dict[str, Any], dict[str, str]]:
    """Every needed network that has its file; the others map to the reason (one line each)."""
    weights = cfg.weights
    archs = OmegaConf.to_container(cfg.architectures, resolve=True)
    assert isinstance(archs, dict)
    nets: dict[str, Any] = {}
    missing: dict[str, str] = {}
    for key in ("passt", "panns", "vggish", "imagebind", "clap", "synchformer"):
        if key not in needed:
            continue
        try:
            path = MD.weight_path(key, weights[key], weights.cache_dir)
            t0 = time.time()
            if key == "imagebind":
                net = MD.ImageBindNet.from_file(path, archs.get("imagebind"))
            elif key == "clap":
                net = MD.ClapNet.from_file(path, hf_home=weights.clap_hf_home, device=str(device))
            elif key == "synchformer":
                net = load_synchformer_av(path, _synchformer_config(archs.get("synchformer")))
            else:
                net = MD.LOADERS[key](path)
            nets[key] = net.to(device)
            log.info("loaded %s from %s (%.1f s)", MD.WEIGHTS[key].title, path, time.time() - t0)
        except ImportError as exc:
            missing[key] = f"the package for {MD.WEIGHTS[key].title} is not installed ({exc})"
        except WeightsError as exc:
            missing[key] = str(exc)
    return nets, missing


def run(args: argparse.Namespace, cfg: DictConfig) -> int:
    gen_dir = Path(args.generated)
    out_dir = Path(args.out or cfg.evaluation.output_dir or gen_dir / "evaluation")
    pairing = pair_by_id(gen_dir, args.reference, args.infer_csv, cfg.data.data_root)
    if not pairing.pairs:
        raise WavFlowError(
            f"no id is on both sides: {len(pairing.missing_generated)} reference id(s) lack a generated wav, "
            f"{len(pairing.missing_reference)} generated id(s) are not in {args.reference}"
        )
    wanted = list(cfg.metrics.enabled)
    device = resolve_device(str(cfg.evaluation.device), key="evaluation.device")
    nets, missing_nets = load_networks(cfg, {METRIC_NETWORK[m] for m in wanted}, device)
    not_computed = {m: missing_nets[METRIC_NETWORK[m]] for m in wanted if METRIC_NETWORK[m] in missing_nets}
    computable = [m for m in wanted if m not in not_computed]

    extractor = Extractor(nets, device=device, duration=float(cfg.data.audio_duration),
                          desync_segments=int(cfg.metrics.desync_segments))
    t0 = time.time()

    def progress(i: int, n: int) -> None:
        if i % 50 == 0:
            log.info("clip %d / %d (%.0f s)", i, n, time.time() - t0)

    feats, clip_problems = extract_all(pairing, extractor, progress) if nets else ({}, {})
    if not nets:  # no network at all: still check that every file on both sides reads
        for pair in pairing.pairs:
            for side, path in (("generated", pair.generated), ("reference", pair.reference)):
                try:
                    load_audio(path, 16000)
                except WavFlowError as exc:
                    pairing.unreadable.setdefault(pair.id, f"{side}: {exc}")
    groups = compute_report(pairing, feats, computable, is_splits=int(cfg.metrics.is_splits),
                            is_seed=int(cfg.metrics.is_seed))
    report = {
        "generated": str(gen_dir.resolve()),
        "reference": str(Path(args.reference).resolve()),
        "infer_csv": str(Path(args.infer_csv).resolve()) if args.infer_csv else None,
        "audio_duration": float(cfg.data.audio_duration),
        "groups": groups,
        "not_computed": not_computed,
        "pairing": pairing.report(),
        "clip_problems": clip_problems,
        "paper_wavflow_m_16k": PAPER_WAVFLOW_M_16K,
        "seconds": round(time.time() - t0, 1),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "metrics.json", to_json(report))
    print(format_table(groups, computable))
    for metric, why in not_computed.items():
        print(f"not computed: {metric}: {why}")
    summary = pairing.report()
    for what in ("missing_generated", "missing_reference", "unreadable"):
        items = summary[what]
        assert isinstance(items, dict)
        for rid, why in items.items():
            print(f"{what}: {rid}: {why}")
    for rid, problems in clip_problems.items():
        for why in problems:
            print(f"clip {rid}: {why}")
    print(f"metrics.json: {out_dir / 'metrics.json'}")
    left_out = ([f"id {rid!r}: {why}" for what in ("unreadable", "missing_generated", "missing_reference")
                 for rid, why in summary[what].items()]  # type: ignore[union-attr]
                + [f"clip {rid!r}: {why}" for rid, whys in clip_problems.items() for why in whys]
                + [f"{metric} not computed: {why}" for metric, why in not_computed.items()])
    if left_out:  # exit 1, and the last line names the first thing left out (docs/errors.md)
        raise RowsFailedError(f"{len(left_out)} item(s) left out of the evaluation, each listed above and in "
                              f"{out_dir / 'metrics.json'}; first: {left_out[0]}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s %(levelname)s] %(message)s")
    return run_job("evaluate", lambda: _evaluate(sys.argv[1:] if argv is None else argv))


def _evaluate(argv: Sequence[str]) -> int:
    args, overrides = parse_args(argv)
    return run(args, load_eval_config(args.config, overrides))
