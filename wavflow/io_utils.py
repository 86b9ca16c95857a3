"""Crash-safe file writing, safe loading of untrusted files, and file-name safety."""

from __future__ import annotations

import io
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from wavflow.errors import CheckpointError, ManifestError


def _atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb") -> Path:
    """Write through `write(fileobj)` to a temp file beside `path`, fsync, then rename.

    A crash at any point leaves either the old file or the new one, never a torn file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp makes 0600; give the usual mode
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save(obj) to `path` atomically (temp file + fsync + rename)."""
    return _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return _atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return _atomic_write(path, lambda f: f.write(text), mode="w")


def atomic_write_csv(df: Any, path: str | os.PathLike) -> Path:
    """Write a pandas DataFrame as CSV (no index) atomically."""
    buf = io.StringIO()
    df.to_csv(buf, index=False)
    return atomic_write_text(path, buf.getvalue())


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def describe_load_error(exc: BaseException) -> str:
    """One line naming what went wrong, without PyTorch's multi-paragraph weights_only advice."""
    cause = exc.__cause__ if isinstance(exc, CheckpointError) and exc.__cause__ is not None else exc
    text = _ANSI.sub("", str(cause))
    if "Weights only load failed" in text:
        # keep only the WeightsUnpickler line (what was refused), drop the "how to bypass" advice
        detail = next((line.split("WeightsUnpickler error:", 1)[1] for line in text.splitlines()
                       if "WeightsUnpickler error:" in line), "")
        detail = detail.strip().split(". ")[0].rstrip(".")
        first = "holds objects a weights-only load refuses" + (f": {detail}" if detail else "")
    else:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        first = lines[0] if lines else ""
    if len(first) > 200:
        first = first[:197] + "..."
    return f"{type(cause).__name__}: {first}" if first else type(cause).__name__


def safe_torch_load(path: str | os.PathLike, *, what: str = "checkpoint") -> Any:
    """torch.load with weights_only=True; any failure becomes a CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for truncated / foreign files
        raise CheckpointError(
            f"{what} {path} could not be loaded ({describe_load_error(exc)}). "
            "The file is corrupt, truncated, or not a weights-only torch file."
        ) from exc


MAX_ID_BYTES = 200  # leaves room for suffixes such as ".pth" or "_rank0.csv" under the 255-byte limit
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._\-]+")


def check_safe_id(sample_id: str, *, where: str = "") -> str:
    """Reject ids that cannot be used verbatim as a file name inside an output folder."""
    loc = f" ({where})" if where else ""

    def bad(rule: str) -> ManifestError:
        return ManifestError(f"id {sample_id!r}{loc} is unsafe as a file name: {rule}")

    if not sample_id or sample_id.strip() != sample_id:
        raise bad("it is empty or has leading/trailing spaces")
    if "/" in sample_id or "\\" in sample_id or ".." in sample_id or sample_id == ".":
        raise bad("it contains a path separator or '..'")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in sample_id):
        raise bad("it contains a control character (newline, tab, ...)")
    if sample_id.startswith("-"):
        raise bad("it starts with '-' (would read as an option to command-line tools)")
    if len(sample_id.encode("utf-8")) > MAX_ID_BYTES:
        raise bad(f"it is longer than {MAX_ID_BYTES} bytes (file names are limited to 255)")
    return sample_id


def sanitize_filename(name: str, fallback: str = "sample") -> str:
    """Make `name` a safe file stem: keep [A-Za-z0-9._-], replace the rest by '_', no '..'."""
    stem = _UNSAFE_CHARS.sub("_", name).strip("._")
    stem = stem.replace("..", "_")
    return stem[:200] or fallback


def path_inside(root: str | os.PathLike, candidate: str | os.PathLike) -> bool:
    """True when `candidate` resolves to a path inside `root`."""
    root_r = Path(root).resolve()
    cand_r = Path(candidate).resolve()
    return cand_r == root_r or root_r in cand_r.parents
