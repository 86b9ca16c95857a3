"""Find pretrained encoder weights: configured path -> cache -> one download attempt.

Offline, a missing weight is a single WeightsError that names the weight, where it comes from
and the exact path to place it at. Downloads go to `<file>.part` and are renamed atomically, so
an interrupted download never counts as cached.
"""

from __future__ import annotations

import contextlib
import os
import urllib.request
from pathlib import Path
from typing import Iterator

from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url
from tqdm import tqdm

from wavflow.errors import WeightsError

SYNCHFORMER_URL = "https://github.com/hkchengrex/MMAudio/releases/download/v0.1/synchformer_state_dict.pth"
SYNCHFORMER_FILENAME = "synchformer_state_dict.pth"
CACHE_ENV = "WAVFLOW_CACHE_DIR"
DOWNLOAD_TIMEOUT_S = 20.0
HUB_TIMEOUT_S = 5.0
# open_clip hub repos hold the config plus weights in one of these names (safetensors first).
HUB_CONFIG_FILENAME = "open_clip_config.json"
HUB_WEIGHT_FILENAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def resolve_cache_dir(configured: str | os.PathLike | None = None) -> Path:
    """`encoders.cache_dir` if set, else `$WAVFLOW_CACHE_DIR`, else `~/.cache/wavflow`."""
    if configured:
        return Path(configured).expanduser()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/wavflow").expanduser()


def _is_cached(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


def download_file(url: str, target: Path, *, timeout: float = DOWNLOAD_TIMEOUT_S, desc: str = "") -> Path:
    """Fetch `url` into `target` via `<target>.part` + fsync + rename. One attempt, no retries."""
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, open(part, "wb") as out:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=desc or target.name) as bar:
                while chunk := resp.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
            out.flush()
            os.fsync(out.fileno())
        os.replace(part, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            part.unlink()
        raise
    return target


def resolve_weight(
    name: str,
    *,
    configured_path: str | os.PathLike | None,
    cache_dir: str | os.PathLike | None,
    filename: str,
    url: str | None = None,
    hub_id: str | None = None,
    allow_download: bool = True,
) -> Path:
    """Return a local file holding weight `name`.

    Order: `configured_path` (must exist) -> `<cache>/<filename>` -> download `url` into the
    cache. `hub_id` only enriches the error message (hub weights are fetched by
    `resolve_hub_files`).
    """
    if configured_path:
        path = Path(configured_path).expanduser()
        if not path.is_file():
            raise WeightsError(f"{name} weights: configured file {path} does not exist")
        return path
    target = resolve_cache_dir(cache_dir) / filename
    if _is_cached(target):
        return target
    source = url or (f"hf-hub:{hub_id}" if hub_id else "no known source")
    if allow_download and url:
        try:
            return download_file(url, target, desc=f"{name} weights")
        except Exception as exc:
            raise WeightsError(
                f"{name} weights: download of {url} failed ({type(exc).__name__}: {exc}). "
                f"Download it by hand and place it at {target} (or set the configured path)."
            ) from exc
    why = "downloads are disabled (encoders.allow_download=false)" if not allow_download else "no download URL"
    raise WeightsError(
        f"{name} weights not found in the cache and {why}. Download {source} and place it at "
        f"{target} (or set the configured path / ${CACHE_ENV})."
    )


@contextlib.contextmanager
def hf_offline(enabled: bool = True) -> Iterator[None]:
    """Make huggingface_hub serve only from its cache (its flag is read at import time)."""
    if not enabled:
        yield
        return
    old = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = old


def resolve_hub_files(
    hub_id: str, *, allow_download: bool = True, hf_cache_dir: str | os.PathLike | None = None
) -> tuple[Path, Path]:
    """Fetch (or find in the Hugging Face cache) an open_clip hub repo's config and weights.

    Returns (config path, weights path). Any failure becomes one WeightsError, quickly: one
    short-timeout request per file, offline mode when downloads are disabled.
    """
    cache = str(hf_cache_dir) if hf_cache_dir else None

    def fetch(filename: str) -> Path:
        try:  # the cache first, without any request
            return Path(hf_hub_download(hub_id, filename, cache_dir=cache, local_files_only=True))
        except Exception:
            if not allow_download:
                raise
        # One short request without retries: hf_hub_download alone backs off for ~25 s offline.
        get_hf_file_metadata(hf_hub_url(hub_id, filename), timeout=HUB_TIMEOUT_S)
        return Path(hf_hub_download(hub_id, filename, cache_dir=cache, etag_timeout=HUB_TIMEOUT_S))

    def fail(exc: BaseException) -> WeightsError:
        mode = "downloads are disabled (encoders.allow_download=false)" if not allow_download else "download failed"
        return WeightsError(
            f"CLIP weights hf-hub:{hub_id} are not in the Hugging Face cache "
            f"({cache or 'default HF cache, $HF_HOME/hub'}) and {mode} ({type(exc).__name__}: {exc}). "
            f"Either pre-populate the cache on a machine with network "
            f"(`hf download {hub_id}`, then copy the cache), or download the open_clip "
            f"checkpoint file and set encoders.clip_pretrained=<file>."
        )

    try:
        config = fetch(HUB_CONFIG_FILENAME)
    except Exception as exc:
        raise fail(exc) from exc
    last: BaseException | None = None
    for filename in HUB_WEIGHT_FILENAMES:
        try:
            return config, fetch(filename)
        except Exception as exc:  # try the next weight format
            last = exc
    assert last is not None
    raise fail(last) from last
