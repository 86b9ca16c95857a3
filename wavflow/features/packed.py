"""The packed feature store: many rows' condition tensors in one shard file, read by memory map
(TRAINING.md, "Large data sets").

A training set of 100,000 rows kept as one `.pth` per row costs one file open (and one unpickle)
per row at every check and every read. A shard is a safetensors file holding the tensors of up to
`shard_rows` rows under the names `<features_key>/<tensor>` (tensor: clip_features, sync_features,
text_features); its header lists every name with its dtype and shape, so a start-up check reads the
headers of a few hundred shards instead of opening every row. safetensors reads no pickled code:
a shard is as safe to open as a `weights_only` load.

A packed training CSV has the usual columns with `features_path` naming the shard and an extra
`features_key` column naming the row in it; rows whose `features_key` is empty are read from their
own `.pth` as before, so a CSV may mix both layouts.

    python -m wavflow.features.packed --csv features/train_vt2a.csv --out features/packed [--shard-rows 256]
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from wavflow.errors import CheckpointError, FeatureError, ManifestError
from wavflow.exit_codes import JobArgumentParser, run_job
from wavflow.io_utils import atomic_write_bytes, atomic_write_csv, check_safe_id, safe_torch_load
from wavflow.manifest import read_manifest, resolve_path

FEATURE_KEYS = ("clip_features", "sync_features", "text_features")
KEY_COLUMN = "features_key"  # the row's name inside its shard; empty: a per-row .pth
FORMAT = "wavflow-packed-features/1"
SHARD_SUFFIX = ".safetensors"
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}


def tensor_name(features_key: str, feature: str) -> str:
    return f"{features_key}/{feature}"


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors' dtype name, e.g. "F32"
    shape: tuple[int, ...]


def read_index(path: Path) -> dict[str, TensorInfo]:
    """Every tensor name of a shard with its dtype and shape, from the header alone."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: TensorInfo(str(f.get_slice(name).get_dtype()), tuple(f.get_slice(name).get_shape()))
                    for name in f.keys()}
    except Exception as exc:  # a missing, truncated or foreign file
        raise FeatureError(f"feature shard {path} could not be read ({type(exc).__name__}: {exc})") from exc


def read_metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:
        return {}


def tensor_problem(index: Mapping[str, TensorInfo], features_key: str, feature: str,
                   want: tuple[int, int]) -> Optional[str]:
    """What is wrong with one needed tensor of a packed row, judged from the shard's header (the
    same wording as a per-row file's check, so the shape hints of the training check apply)."""
    info = index.get(tensor_name(features_key, feature))
    if info is None:
        return f"{feature} missing"
    if info.dtype not in FLOAT_DTYPES:
        return f"{feature} is not a float tensor"
    if info.shape != want:
        return f"{feature} has shape {info.shape}, expected {want}"
    return None


def read_row_features(path: Path, features_key: str, reader: "ShardReader | None", sample_id: str) -> Mapping[str, Any]:
    """The stored tensors of one row: its shard's (features_key set) or its own file's dict.
    FeatureError naming the file and id when it cannot be read."""
    if features_key:
        return (reader or ShardReader()).read(path, features_key, FEATURE_KEYS)
    try:  # the project's one-line safe loader: never PyTorch's multi-line advice text
        feats = safe_torch_load(path, what=f"features file (id {sample_id!r})")
    except CheckpointError as exc:
        raise FeatureError(str(exc)) from exc
    if not isinstance(feats, Mapping):
        raise FeatureError(f"features file {path} (id {sample_id!r}) does not hold a dict")
    return feats


class ShardReader:
    """Reads packed rows, keeping the last few shards open (memory-mapped) in this process.

    Pickled (DataLoader workers started by spawn), it carries no handles; forked workers share
    the parent's read-only maps."""

    def __init__(self, max_open: int = 8) -> None:
        self.max_open = max_open
        self._open: OrderedDict[Path, tuple[Any, frozenset[str]]] = OrderedDict()  # handle, tensor names

    def __getstate__(self) -> dict[str, Any]:
        return {"max_open": self.max_open, "_open": OrderedDict()}

    def _handle(self, path: Path) -> tuple[Any, frozenset[str]]:
        opened = self._open.get(path)
        if opened is not None:
            self._open.move_to_end(path)
            return opened
        try:
            handle = safe_open(str(path), framework="pt")
        except Exception as exc:
            raise FeatureError(f"feature shard {path} could not be read ({type(exc).__name__}: {exc})") from exc
        opened = self._open[path] = (handle, frozenset(handle.keys()))
        while len(self._open) > self.max_open:
            self._open.popitem(last=False)
        return opened

    def read(self, path: Path, features_key: str, features: Sequence[str]) -> dict[str, torch.Tensor]:
        """The named tensors of one row that the shard holds (absent names are left out); a
        FeatureError when the shard holds none of the row's tensors (a wrong features_key)."""
        handle, names = self._handle(path)
        found = {f: handle.get_tensor(tensor_name(features_key, f))
                 for f in features if tensor_name(features_key, f) in names}
        if not found:
            raise FeatureError(f"feature shard {path} holds no row {features_key!r} (features_key)")
        return found


def _atomic_save_shard(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> None:
    """save_file to a temporary name beside `path`, fsync, rename: a crash leaves no torn shard."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        try:
            save_file(tensors, tmp, metadata=metadata)
        except (ValueError, RuntimeError, OSError) as exc:  # safetensors' own text spans lines
            raise FeatureError(f"feature shard {path} could not be written ({type(exc).__name__}: "
                               f"{' '.join(str(exc).split())})") from exc
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _source_stamp(path: Path) -> list[Any]:
    """What a kept shard must have been packed from: the file (resolved), its size and mtime."""
    st = os.stat(path)
    return [str(path.resolve()), int(st.st_size), int(st.st_mtime_ns)]


def _row_tensors(feats: Mapping[str, Any], path: Path, sample_id: str) -> dict[str, torch.Tensor]:
    """The condition tensors of a row, checked: float and finite, at least one (what a shard holds
    is then known good, and its start-up check reads only the header)."""
    out: dict[str, torch.Tensor] = {}
    for key in FEATURE_KEYS:
        value = feats.get(key)
        if value is None:
            continue
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise FeatureError(f"features file {path} (id {sample_id!r}): {key} is not a float tensor")
        if not bool(torch.isfinite(value).all()):
            raise FeatureError(f"features file {path} (id {sample_id!r}): {key} holds non-finite values")
        out[key] = value.detach().contiguous()
    if not out:
        raise FeatureError(f"features file {path} (id {sample_id!r}) holds none of {', '.join(FEATURE_KEYS)}")
    return out


@dataclass(frozen=True)
class PackResult:
    csv_path: Path
    rows: int
    shards: int
    written: int  # shards written by this run (the others were already complete)


def shard_path(out_dir: Path, stem: str, number: int) -> Path:
    return out_dir / f"{stem}_{number:05d}{SHARD_SUFFIX}"


def _own_shards(out_dir: Path, stem: str, csv_key: str) -> list[Path]:
    """The shards in `out_dir` packed from the CSV `csv_key` (by their metadata)."""
    return [p for p in sorted(out_dir.glob(f"{stem}_*{SHARD_SUFFIX}"))
            if p.stem[len(stem) + 1:].isdigit() and read_metadata(p).get("csv") == csv_key]


def pack_csv(csv_path: str | os.PathLike, out_dir: str | os.PathLike, *, data_root: str | None = None,
             shard_rows: int = 256, show_progress: bool = True) -> PackResult:
    """Pack the per-row features of a training CSV into shards under `out_dir`, and write the
    packed CSV `out_dir/<csv stem>.csv` (absolute paths, the input's other columns kept).

    Resumable: a shard whose metadata lists the same rows from the same, unchanged files is kept.
    The packed CSV is removed first and written last, so a packing that stops leaves none that
    points at shards being rewritten."""
    if shard_rows < 1:
        raise ManifestError(f"shard_rows must be >= 1, got {shard_rows}")
    csv_path, out_dir = Path(csv_path), Path(out_dir).absolute()
    stem, out_csv = csv_path.stem, out_dir / f"{csv_path.stem}.csv"
    if out_csv.resolve() == csv_path.resolve():
        raise ManifestError(f"packing {csv_path} into {out_dir} would overwrite it with the packed CSV: "
                            "choose another output folder")
    df = read_manifest(csv_path, ("id", "audio_path", "features_path"), optional=(KEY_COLUMN,))
    if df.empty:
        raise ManifestError(f"training CSV {csv_path} has no rows to pack")
    ids = [check_safe_id(str(i), where=f"{csv_path} line {n + 2}") for n, i in enumerate(df["id"])]
    dupes = sorted(i for i, n in Counter(ids).items() if n > 1)
    if dupes:
        raise ManifestError(f"training CSV {csv_path}: id {dupes[0]!r} appears more than once; a shard names rows by id")
    packed_rows = [n for n, key in enumerate(df[KEY_COLUMN]) if str(key).strip()]
    if packed_rows:
        n = packed_rows[0]
        raise ManifestError(f"training CSV {csv_path} line {n + 2} (id {ids[n]!r}) is already packed (features_key): "
                            "pack the per-row CSV the shards were made from")
    sources = [resolve_path(p, data_root) for p in df["features_path"]]
    for n, src in enumerate(sources):
        if not src.is_file():
            raise ManifestError(f"training CSV {csv_path} line {n + 2} (id {ids[n]!r}): features_path not found: {src}")
    csv_key = str(csv_path.resolve())
    out_dir.mkdir(parents=True, exist_ok=True)
    for other in out_dir.glob(f"{stem}_*{SHARD_SUFFIX}"):  # never overwrite another CSV's shards
        owner = read_metadata(other).get("csv")
        if other.stem[len(stem) + 1:].isdigit() and owner not in (None, csv_key):
            raise ManifestError(f"{out_dir} holds shards of another CSV named {csv_path.name} ({owner}): "
                                "pack into another folder")
    out_csv.unlink(missing_ok=True)  # rewritten last: until then no CSV points at these shards
    shards, written = [], 0
    for number, start in enumerate(tqdm(range(0, len(ids), shard_rows), desc="pack shards",
                                        disable=not show_progress)):
        part = range(start, min(start + shard_rows, len(ids)))
        path = shard_path(out_dir, stem, number)
        metadata = {"format": FORMAT, "csv": csv_key, "rows": json.dumps([ids[i] for i in part]),
                    "sources": json.dumps([_source_stamp(sources[i]) for i in part])}
        shards.append(path)
        if path.is_file() and read_metadata(path) == metadata:
            continue  # finished by an earlier run, from the same files
        tensors: dict[str, torch.Tensor] = {}
        for i in part:
            feats = read_row_features(sources[i], "", None, ids[i])  # per-row files only (packed rows refused)
            tensors.update({tensor_name(ids[i], k): v for k, v in _row_tensors(feats, sources[i], ids[i]).items()})
        _atomic_save_shard(tensors, metadata, path)
        written += 1
    _write_beside_files(sources, out_dir)
    packed = df.copy()
    packed["audio_path"] = [str(resolve_path(p, data_root)) for p in df["audio_path"]]
    packed["features_path"] = [str(shards[n // shard_rows]) for n in range(len(ids))]
    packed[KEY_COLUMN] = ids
    atomic_write_csv(packed, out_csv)
    for stale in _own_shards(out_dir, stem, csv_key):  # left from a longer CSV, or more rows per shard
        if stale not in shards:
            stale.unlink()
    return PackResult(out_csv, len(ids), len(shards), written)


def _write_beside_files(sources: Sequence[Path], out_dir: Path) -> None:
    """What the trainer looks for beside the features it reads: the first row's folder's
    empty-caption feature (as for per-row files), and the feature statistics of every source
    folder pooled (as data.feature_norm pools them over folders). A file the sources lack is
    removed from `out_dir`, never left from an earlier packing."""
    from wavflow.features.report import FeatureStats, STATS_FILENAME  # lazy: report imports this module

    empty = sources[0].parent / "empty_string.pt"
    if empty.is_file():
        if empty.resolve() != (out_dir / empty.name).resolve():
            atomic_write_bytes(out_dir / empty.name, empty.read_bytes())
    else:
        (out_dir / empty.name).unlink(missing_ok=True)
    folders = sorted({s.parent for s in sources})
    stats = [f / STATS_FILENAME for f in folders]
    if all(p.is_file() for p in stats):
        FeatureStats.merge([FeatureStats.load(p) for p in stats], where=f"feature statistics of {len(folders)} "
                           "folder(s)").save(out_dir / STATS_FILENAME)
    else:
        (out_dir / STATS_FILENAME).unlink(missing_ok=True)


def main(argv: Sequence[str] | None = None) -> int:
    return run_job("features.packed", lambda: _pack(argv))


def _pack(argv: Sequence[str] | None) -> int:
    parser = JobArgumentParser(prog="python -m wavflow.features.packed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--csv", required=True, help="training CSV (extraction output)")
    parser.add_argument("--out", required=True, help="folder for the shards and the packed CSV")
    parser.add_argument("--shard-rows", type=int, default=256, help="rows per shard (256 rows of 8 s clips: ~300 MB)")
    parser.add_argument("--data-root", default=None, help="what relative paths in the CSV resolve against")
    args = parser.parse_args(argv)
    result = pack_csv(args.csv, args.out, data_root=args.data_root, shard_rows=args.shard_rows)
    print(f"packed {result.rows} rows into {result.shards} shard(s) ({result.written} written, "
          f"{result.shards - result.written} already complete): train with data.train_csv={result.csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
