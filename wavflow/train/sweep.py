"""Training sweeps: `train_single_node.sh -m training.lr=1e-4,3e-4 training.max_steps=200`.

Hydra's override grammar expands the sweep (`a,b`, `range(...)`, `choice(...)`, cartesian
product over the swept keys). The points run one after another, each as its own training
job in `<training.output_dir>/<training.experiment_id>-<swept overrides>/`, and a table of the
runs and their final loss is printed at the end.

Sweeps and multi-process training: the sweep is expanded here, outside torchrun, and every
point starts one torchrun (`--nproc N`, what the launcher passes) or one plain process (no
`--nproc`). A training process never expands a sweep itself (`-m` under torchrun is an error),
so torchrun is never nested and all ranks of a point always run the same configuration.
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from wavflow.config import format_override, load_config, parse_launch
from wavflow.exit_codes import run_job
from wavflow.errors import ConfigError

_LOSS = re.compile(r"GlobalStep (\d+) Loss: (\S+)")
_UNSAFE = re.compile(r"[^A-Za-z0-9._=+,-]")


@dataclass(frozen=True)
class SweepPoint:
    overrides: list[str]  # every override of this run, sweeps replaced by one value
    swept: list[tuple[str, str]]  # (key, value) of the swept keys only: the run's name


def expand(overrides: Sequence[str]) -> list[SweepPoint]:
    """The cartesian product of the sweep overrides (Hydra's grammar); others are kept as typed."""
    # lazy: hydra's override parser costs ~0.07 s to import (measured after torch, omegaconf);
    # only a -m sweep needs it
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    axes: list[list[tuple[str, str | None]]] = []  # per override: (word, swept value or None)
    for item in overrides:
        try:
            parsed = parser.parse_override(item)
        except Exception:  # noqa: BLE001 - not Hydra syntax (e.g. a path with ' #'): one plain value
            axes.append([(item, None)])
            continue
        if not parsed.is_sweep_override():
            axes.append([(item, None)])
            continue
        prefix = item[: len(item) - len(item.lstrip("+"))]
        key = parsed.key_or_group
        values = list(parsed.sweep_string_iterator())
        if not values:
            raise ConfigError(f"sweep {item!r} has no values")
        axes.append([(f"{prefix}{key}={v}", v) for v in values])
    points = []
    for combo in itertools.product(*axes):
        words = [w for w, _ in combo]
        swept = [(w.split("=", 1)[0].lstrip("+"), v) for w, v in combo if v is not None]
        points.append(SweepPoint(words, swept))
    return points


def run_name(base: str, swept: Sequence[tuple[str, str]]) -> str:
    """'test_wavflow' + [('training.lr', '0.0001')] -> 'test_wavflow-lr=0.0001' (a safe folder name)."""
    if not swept:
        return base
    last = [k.rsplit(".", 1)[-1] for k, _ in swept]
    keys = last if len(set(last)) == len(last) else [k for k, _ in swept]
    text = ",".join(f"{k}={v}" for k, (_, v) in zip(keys, swept))
    return f"{base}-" + _UNSAFE.sub("_", text).replace("..", "_")


def final_loss(log: Path) -> tuple[int | None, float | None]:
    """(global step, loss) of the last step line in a run's training.log."""
    if not log.is_file():
        return None, None
    found = _LOSS.findall(log.read_text(errors="replace"))
    if not found:
        return None, None
    step, loss = found[-1]
    try:
        return int(step), float(loss)
    except ValueError:
        return int(step), None


def format_table(rows: Sequence[dict]) -> str:
    """The end-of-sweep table: one line per run."""
    head = ("run", "exit", "step", "final loss", "overrides")
    body = [
        (
            r["name"],
            str(r["rc"]),
            "-" if r["step"] is None else str(r["step"]),
            "-" if r["loss"] is None else f"{r['loss']:.4f}",
            " ".join(f"{k}={v}" for k, v in r["swept"]),
        )
        for r in rows
    ]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in (head, *body)]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def run_sweep(config: str, overrides: Sequence[str], nproc: int | None = None) -> int:
    """Run every point of the sweep in turn; print the table; the first failing exit code, else 0."""
    points = expand(overrides)
    plans = []
    for point in points:  # every point's config is checked before the first run starts
        cfg = load_config(config, point.overrides, job="train")
        name = run_name(str(cfg.training.experiment_id), point.swept)
        plans.append((point, name, Path(str(cfg.training.output_dir)) / name))
    names = [name for _, name, _ in plans]
    if len(set(names)) != len(names):
        raise ConfigError(f"sweep points share a run folder ({', '.join(names)}): sweep over different values")
    print(f"[wavflow.sweep] {len(plans)} run(s): {', '.join(names)}", file=sys.stderr, flush=True)
    rows = []
    for i, (point, name, exp_dir) in enumerate(plans, 1):
        job = [*point.overrides, format_override("training.experiment_id", name)]
        if nproc is None:
            cmd = [sys.executable, "-m", "wavflow.train", "--config", config, *job]
        else:
            cmd = [sys.executable, "-m", "wavflow.torchrun_guard", "--standalone", f"--nproc_per_node={nproc}",
                   "-m", "wavflow.train", "--config", config, *job]
        print(f"[wavflow.sweep] run {i}/{len(plans)}: {name}", file=sys.stderr, flush=True)
        rc = subprocess.run(cmd, env=dict(os.environ, WAVFLOW_SWEEP="1")).returncode
        step, loss = final_loss(exp_dir / "training.log")
        rows.append({"name": name, "rc": rc, "step": step, "loss": loss, "swept": point.swept, "dir": exp_dir})
    print(format_table(rows), flush=True)
    failed = [r["rc"] for r in rows if r["rc"] != 0]
    return failed[0] if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m wavflow.train.sweep [--nproc N] [--config PATH] -m key=a,b ...`"""
    return run_job("sweep", lambda: _sweep(list(sys.argv[1:] if argv is None else argv)))


def _sweep(args: list[str]) -> int:
    nproc = None
    if args[:1] == ["--nproc"]:
        if len(args) < 2 or not args[1].isdigit() or int(args[1]) < 1:
            raise ConfigError("--nproc needs a positive number of processes")
        nproc, args = int(args[1]), args[2:]
    launch = parse_launch(args, "train.yaml")
    return run_sweep(launch.config, launch.overrides, nproc)

if __name__ == "__main__":
    sys.exit(main())
