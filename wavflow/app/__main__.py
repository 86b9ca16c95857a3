"""python -m wavflow.app [--config PATH] [--host H] [--port N] [key=value ...]

Loads the checkpoint (model.ckpt_path) once, then serves the page until stopped. A missing
checkpoint, one of another preset than asked for, or a bad key ends start-up with one line
and a non-zero exit code (docs/errors.md)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from wavflow.app.generation import Studio
from wavflow.config import format_override, load_config, parse_cli
from wavflow.errors import ConfigError
from wavflow.exit_codes import EXIT_OK, run_job

FLAGS = {"--host": "app.host", "--port": "app.port"}


def pop_flags(argv: Sequence[str]) -> list[str]:
    """`--host H` / `--port N` (or `--port=N`) as the overrides app.host / app.port."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if name in FLAGS:
            if not eq:
                if i + 1 >= len(argv) or argv[i + 1].startswith("-"):
                    raise ConfigError(f"{name} needs a value (e.g. {name} {'127.0.0.1' if name == '--host' else '7860'})")
                value, i = argv[i + 1], i + 1
            out.append(format_override(FLAGS[name], int(value) if name == "--port" and value.isdigit() else value))
        else:
            out.append(arg)
        i += 1
    return out


def serve(args: list[str]) -> int:
    path, overrides = parse_cli(pop_flags(args), "app.yaml")
    cfg = load_config(path, overrides, job="app")
    if not 0 < int(cfg.app.port) < 65536:
        raise ConfigError(f"app.port must be between 1 and 65535, got {cfg.app.port}")
    if int(cfg.app.concurrency) < 1:
        raise ConfigError(f"app.concurrency must be >= 1, got {cfg.app.concurrency}")
    out_root = Path(str(cfg.output.output_dir)).absolute()
    out_root.mkdir(parents=True, exist_ok=True)
    # Before Gradio is imported: its uploads and cache stay under the output folder, no analytics.
    os.environ["GRADIO_TEMP_DIR"] = str(out_root / ".gradio")
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    from wavflow.app.page import build_page  # lazy: imports gradio, which reads the environment above

    studio = Studio.load(cfg)
    page = build_page(studio)
    page.queue(default_concurrency_limit=int(cfg.app.concurrency))
    page.launch(server_name=str(cfg.app.host), server_port=int(cfg.app.port), allowed_paths=[str(out_root)],
                max_file_size=int(float(cfg.app.max_upload_mb) * 1024 * 1024), quiet=False,
                prevent_thread_lock=True)
    studio.warm_up()  # the text encoder, once the page already answers (a first request waits for it)
    page.block_thread()
    return EXIT_OK


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s %(levelname)s] %(message)s")
    args = list(sys.argv[1:] if argv is None else argv)
    return run_job("app", lambda: serve(args))


if __name__ == "__main__":
    sys.exit(main())
