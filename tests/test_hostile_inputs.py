"""One hostile-input matrix over every job's `main(argv)` (extract, train, predict, evaluate, the
demo, the demo data set, the feature report): truncated / empty / wrong-format media, NaN and
wrong-shape feature files, pickles that execute code, CSVs with missing columns, duplicate and
unsafe ids, paths leaving the data root, nonsense and huge values, a checkpoint of another
preset, a directory given as a file and a file given as a folder, and an output folder that
cannot be written.

Every case asserts the contract of wavflow/exit_codes.py:
- the documented exit code (non-zero; or 0 where the row policy lets a bad row be skipped, the
  row then being reported where the job says: the error log, summary.csv);
- the last line of stderr is `[wavflow.<job>] error: ...` and names the file / row / key at fault;
- no traceback anywhere in the output (a traceback means an input was not validated);
- nothing created or changed under the case's folder outside its output folder;
- no partial file (`*.tmp`, `*.partial`, `.tmp*`: io_utils' atomic writers use `.<name>.<rand>.tmp`)
  left anywhere, output folder included;
- code in a hostile pickle never runs (its payload would create a marker file).

Jobs run in-process (fast): no model larger than tiny_16k, fake encoders for extraction.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable, Optional

import av
import pandas as pd
import pytest
import torch

from tests.media import sine, truncated_copy, write_corrupt_video, write_video, write_wav
from tests.test_extract import FakeEncoders, write_csv
from tests.test_train_common import make_dataset as make_train_dataset
from tests.test_train_common import overrides as train_overrides

SR = 16000
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
# io_utils' atomic writers leave `.<name>.<random>.tmp` while writing; extraction's per-rank parts
# (`<stem>_rank<r>.csv`, `<stem>_errors_rank<r>.log`) exist only until rank 0 merges them.
PARTIAL = re.compile(r"(\.tmp$|\.partial$|^\.tmp|_rank\d+\.csv$|_errors_rank\d+\.log$)")


# ------------------------------------------------------------------------------ the jobs
def _main(job: str) -> Callable[[list[str]], int]:
    if job == "extract":
        from wavflow.features.extract import main
    elif job == "train":
        from wavflow.train.__main__ import main
    elif job == "predict":
        from wavflow.predict import main
    elif job == "evaluate":
        from wavflow.evaluate.cli import main
    elif job == "demo":
        from wavflow.demo.__main__ import main
    elif job == "make_dataset":
        from wavflow.demo.make_dataset import main
    elif job == "features.report":
        from wavflow.features.report import main
    else:
        raise AssertionError(job)
    return main


@dataclass
class Built:
    """What a builder made: the command line, the case's output folder, and what else to check."""

    argv: list[str]
    out: Path  # everything the job may write lies under here
    marker: Optional[Path] = None  # a hostile pickle's payload would create this file
    check: Optional[Callable[[], None]] = None  # extra assertions after the run


@dataclass(frozen=True)
class Case:
    id: str
    job: str
    build: Callable[[Path, "Shared"], Built]
    code: int
    # What the last stderr line must contain (regex); None: the job succeeded (exit 0) and
    # `check` finds the skipped row where the job reports it.
    last: Optional[str]


@dataclass
class Shared:
    """Heavy inputs made once per module (a tiny predict checkpoint, a small_16k state dict)."""

    root: Path
    predict_ckpt: Path
    small_ckpt: Path


# --------------------------------------------------------------------------- hostile files
class _Payload:
    """Unpickling this runs `open(marker, "w")`: a weights-only load must refuse it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def evil_pickle(path: Path, marker: Path, *, wrap: Callable[[object], object] = lambda x: x) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(wrap(_Payload(marker)), path)
    return path


def audio_only_mp4(path: Path, seconds: float = 2.0) -> Path:
    """An mp4 with an AAC audio stream and no video stream at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream("aac", rate=SR, layout="mono")
        frame = av.AudioFrame.from_ndarray(sine(440.0, seconds, SR, 0.3)[None, :], format="flt", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = SR, 0, Fraction(1, SR)
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def unwritable_out(tmp: Path) -> Path:
    """An output folder that cannot be created / written: a read-only folder (chmod 0o555) for
    a normal user; as root (chmod does not stop root) a folder whose parent is a regular file,
    which fails mkdir with the same kind of OSError."""
    if IS_ROOT:
        blocker = tmp / "blocker"
        blocker.write_text("a file where a folder is expected\n")
        return blocker / "out"
    ro = tmp / "readonly"
    ro.mkdir()
    ro.chmod(0o555)
    return ro / "out"


# ------------------------------------------------------------------------------- extract
EXTRACT_SHORT = ["extraction.duration_sec=2", "data.clip_seq_len=16", "data.sync_seq_len=40"]


def extract_args(tmp: Path, csv: Path, mode: str = "t2a", out: Optional[Path] = None, *extra: str) -> list[str]:
    out = out or tmp / "out"
    return [
        "--config", f"extract_{mode}.yaml", f"extraction.mode={mode}", "encoders.profile=tiny",
        f"data.csv_path={csv}", f"data.data_root={tmp / 'data'}",
        f"output.pth_dir={out / 'pth'}", f"output.csv_path={out / 'train.csv'}",
        "extraction.num_workers=0", *EXTRACT_SHORT, *extra,
    ]


def extract_rows(tmp: Path, rows: list[list[str]], *, videos: bool = False,
                 header: Optional[list[str]] = None) -> Path:
    """Good media for ids good0/good1 plus the given rows; returns the input CSV."""
    data = tmp / "data"
    good = []
    for i in range(2):
        write_wav(data / f"good{i}.wav", sine(220.0 * (i + 1), 2.0, SR), SR)
        if videos:
            write_video(data / f"good{i}.mp4", seconds=2.0)
        good.append([f"good{i}", f"good{i}.wav", f"good{i}.mp4", f"caption {i}"])
    all_rows = good + rows
    header = header or (["id", "audio_path", "video_path", "caption"] if videos else ["id", "audio_path", "caption"])
    if not videos:
        all_rows = [[r[0], r[1], r[-1]] for r in all_rows]
    return write_csv(data / "input.csv", header, all_rows)


def x_text_as_wav(tmp: Path, _s: Shared) -> Built:
    (tmp / "data").mkdir()
    (tmp / "data" / "text.wav").write_text("this is not audio\n")
    csv = extract_rows(tmp, [["textwav", "text.wav", "", "a caption"]])
    return Built(extract_args(tmp, csv), tmp / "out")


def x_empty_wav(tmp: Path, _s: Shared) -> Built:
    (tmp / "data").mkdir()
    (tmp / "data" / "empty.wav").write_bytes(b"")
    csv = extract_rows(tmp, [["emptywav", "empty.wav", "", "a caption"]])
    return Built(extract_args(tmp, csv), tmp / "out")


def x_empty_wav_within_policy(tmp: Path, _s: Shared) -> Built:
    """The same bad row under data.max_failed_fraction=0.5: exit 0, the row in the error log."""
    built = x_empty_wav(tmp, _s)
    built.argv.append("data.max_failed_fraction=0.5")

    def check() -> None:
        errors = (tmp / "out" / "train_errors.log").read_text()
        assert errors.startswith("emptywav\t") and "empty.wav" in errors, errors
        kept = pd.read_csv(tmp / "out" / "train.csv", dtype=str)["id"].tolist()
        assert kept == ["good0", "good1"], kept

    built.check = check
    return built


def x_truncated_mp4(tmp: Path, _s: Shared) -> Built:
    data = tmp / "data"
    write_wav(data / "t.wav", sine(300.0, 2.0, SR), SR)
    whole = write_video(tmp / "whole.mp4", seconds=2.0)
    truncated_copy(whole, data / "trunc.mp4", 0.3)
    whole.unlink()
    csv = extract_rows(tmp, [["trunc", "t.wav", "trunc.mp4", "a caption"]], videos=True)
    return Built(extract_args(tmp, csv, "vt2a"), tmp / "out")


def x_corrupt_mp4(tmp: Path, _s: Shared) -> Built:
    data = tmp / "data"
    write_wav(data / "c.wav", sine(300.0, 2.0, SR), SR)
    write_corrupt_video(data / "garbage.mp4")
    csv = extract_rows(tmp, [["garbage", "c.wav", "garbage.mp4", "a caption"]], videos=True)
    return Built(extract_args(tmp, csv, "vt2a"), tmp / "out")


def x_mp4_without_video(tmp: Path, _s: Shared) -> Built:
    data = tmp / "data"
    write_wav(data / "n.wav", sine(300.0, 2.0, SR), SR)
    audio_only_mp4(data / "novideo.mp4")
    csv = extract_rows(tmp, [["novideo", "n.wav", "novideo.mp4", "a caption"]], videos=True)
    return Built(extract_args(tmp, csv, "vt2a"), tmp / "out")


def x_missing_column(tmp: Path, _s: Shared) -> Built:
    csv = extract_rows(tmp, [], header=["id", "audio_path", "caption"], videos=False)
    return Built(extract_args(tmp, csv, "vt2a"), tmp / "out")


def x_duplicate_ids(tmp: Path, _s: Shared) -> Built:
    csv = extract_rows(tmp, [["good0", "good1.wav", "", "again"]])
    return Built(extract_args(tmp, csv), tmp / "out")


def x_dotdot_id(tmp: Path, _s: Shared) -> Built:
    csv = extract_rows(tmp, [["../evil", "good0.wav", "", "escape"]])
    return Built(extract_args(tmp, csv), tmp / "out")


def x_path_outside_root(tmp: Path, _s: Shared) -> Built:
    write_wav(tmp / "outside.wav", sine(300.0, 2.0, SR), SR)  # exists, but outside data.data_root
    csv = extract_rows(tmp, [["climber", "../outside.wav", "", "a caption"]])
    return Built(extract_args(tmp, csv), tmp / "out")


def x_negative_duration(tmp: Path, _s: Shared) -> Built:
    csv = extract_rows(tmp, [])
    return Built(extract_args(tmp, csv, "t2a", None, "data.audio_duration=-1"), tmp / "out")


def x_negative_extraction_duration(tmp: Path, _s: Shared) -> Built:
    csv = extract_rows(tmp, [], videos=True)
    return Built(extract_args(tmp, csv, "vt2a", None, "extraction.duration_sec=-2"), tmp / "out")


def x_huge_batch(tmp: Path, _s: Shared) -> Built:
    csv = extract_rows(tmp, [])
    return Built(extract_args(tmp, csv, "t2a", None, f"extraction.batch_size={10**12}"), tmp / "out")


def x_huge_duration(tmp: Path, _s: Shared) -> Built:
    csv = extract_rows(tmp, [], videos=True)
    return Built(extract_args(tmp, csv, "vt2a", None, "extraction.duration_sec=1e9"), tmp / "out")


def x_csv_is_directory(tmp: Path, _s: Shared) -> Built:
    extract_rows(tmp, [])
    folder = tmp / "data" / "input_dir.csv"
    folder.mkdir()
    return Built(extract_args(tmp, folder), tmp / "out")


def x_unwritable_out(tmp: Path, _s: Shared) -> Built:
    csv = extract_rows(tmp, [])
    out = unwritable_out(tmp)
    return Built(extract_args(tmp, csv, "t2a", out), out)


# --------------------------------------------------------------------------------- train
def train_args(tmp: Path, csv: Path | str, out: Optional[Path] = None, **extra: object) -> list[str]:
    args = train_overrides(tmp, csv, **extra)
    if out is not None:
        args = [a for a in args if not a.startswith("training.output_dir=")] + [f"training.output_dir={out}"]
    return args


def t_features(tmp: Path, fill: float) -> Built:
    csv = make_train_dataset(tmp)
    feats = torch.load(tmp / "features" / "vt2a_3.pth")
    feats["sync_features"][3, 5] = fill
    torch.save(feats, tmp / "features" / "vt2a_3.pth")
    return Built(train_args(tmp, csv), tmp / "out")


def t_nan_features(tmp: Path, _s: Shared) -> Built:
    return t_features(tmp, float("nan"))


def t_inf_features(tmp: Path, _s: Shared) -> Built:
    return t_features(tmp, float("inf"))


def t_wrong_shape_error_policy(tmp: Path, _s: Shared) -> Built:
    csv = make_train_dataset(tmp)
    feats = torch.load(tmp / "features" / "t2a_1.pth")
    feats["text_features"] = torch.zeros(5, 7)
    torch.save(feats, tmp / "features" / "t2a_1.pth")
    return Built(train_args(tmp, csv, data__on_bad_row="error"), tmp / "out")


def t_evil_feature_file(tmp: Path, _s: Shared) -> Built:
    csv = make_train_dataset(tmp)
    marker = tmp / "PWNED_feature"
    evil_pickle(tmp / "features" / "v2a_2.pth", marker, wrap=lambda p: {"clip_features": p})
    return Built(train_args(tmp, csv), tmp / "out", marker=marker)


def t_evil_resume_checkpoint(tmp: Path, _s: Shared) -> Built:
    csv = make_train_dataset(tmp)
    marker = tmp / "PWNED_resume"
    evil_pickle(tmp / "out" / "exp" / "checkpoint_latest.pth", marker, wrap=lambda p: {"model": p})
    return Built(train_args(tmp, csv), tmp / "out", marker=marker)


def t_missing_columns(tmp: Path, _s: Shared) -> Built:
    csv = make_train_dataset(tmp)
    df = pd.read_csv(csv, dtype=str)
    df.drop(columns=["features_path"]).to_csv(csv, index=False)
    return Built(train_args(tmp, csv), tmp / "out")


def _edit_train_csv(tmp: Path, row: int, column: str, value: str) -> Path:
    csv = make_train_dataset(tmp)
    df = pd.read_csv(csv, dtype=str, keep_default_na=False)
    df.loc[row, column] = value
    df.to_csv(csv, index=False)
    return csv


def t_duplicate_ids(tmp: Path, _s: Shared) -> Built:
    return Built(train_args(tmp, _edit_train_csv(tmp, 2, "id", "vt2a_0")), tmp / "out")


def t_dotdot_id(tmp: Path, _s: Shared) -> Built:
    return Built(train_args(tmp, _edit_train_csv(tmp, 1, "id", "../escape")), tmp / "out")


def t_path_outside_root(tmp: Path, _s: Shared) -> Built:
    root = tmp / "root"
    csv = make_train_dataset(root, relative=True)  # paths relative to root = data.data_root
    df = pd.read_csv(csv, dtype=str, keep_default_na=False)
    df.loc[1, "audio_path"] = "../outside.wav"  # exists, but outside data.data_root
    df.to_csv(csv, index=False)
    write_wav(tmp / "outside.wav", sine(300.0, 0.3, SR), SR)
    return Built(train_args(tmp, csv, data__data_root=str(root)), tmp / "out")


def t_negative_duration(tmp: Path, _s: Shared) -> Built:
    return Built(train_args(tmp, make_train_dataset(tmp), data__audio_duration=-1), tmp / "out")


def t_huge_duration(tmp: Path, _s: Shared) -> Built:
    """1e12 s of audio: 8e13 patches. Its RoPE table alone (3.2e14 bytes) is past any address space,
    so the allocation fails at once on every machine (never a slow out-of-memory kill)."""
    return Built(train_args(tmp, make_train_dataset(tmp), data__audio_duration=1e12), tmp / "out")


def t_csv_is_directory(tmp: Path, _s: Shared) -> Built:
    make_train_dataset(tmp)
    (tmp / "folder.csv").mkdir()
    return Built(train_args(tmp, tmp / "folder.csv"), tmp / "out")


def t_unwritable_out(tmp: Path, _s: Shared) -> Built:
    csv = make_train_dataset(tmp)
    out = unwritable_out(tmp)
    return Built(train_args(tmp, csv, out), out)


def t_every_audio_unreadable(tmp: Path, _s: Shared) -> Built:
    csv = make_train_dataset(tmp)
    for wav in (tmp / "audio").glob("*.wav"):
        wav.write_text("not a wav file\n")

    def check() -> None:
        assert not list((tmp / "out").rglob("*.pth")), "no checkpoint when every read failed"

    return Built(train_args(tmp, csv, training__epochs=1), tmp / "out", check=check)


def t_resume_other_preset(tmp: Path, s: Shared) -> Built:
    csv = make_train_dataset(tmp)
    exp = tmp / "out" / "exp"
    exp.mkdir(parents=True)
    (exp / "checkpoint_latest.pth").symlink_to(s.small_ckpt)  # a small_16k run's checkpoint
    return Built(train_args(tmp, csv), tmp / "out")


# ------------------------------------------------------------------------------- predict
PREDICT_BASE = [
    "model.name=tiny_16k", "data.audio_duration=1.0", "data.clip_seq_len=8", "data.sync_seq_len=16",
    "encoders.profile=tiny", "model.use_ema=false", "sampling.num_steps=1",
]


def predict_args(tmp: Path, csv: Path, ckpt: Path, out: Optional[Path] = None, *extra: str) -> list[str]:
    return [*PREDICT_BASE, f"model.ckpt_path={ckpt}", f"data.csv_path={csv}", f"data.data_root={tmp / 'media'}",
            f"output.output_dir={out or tmp / 'out'}", *extra]


def infer_csv(tmp: Path, text: str) -> Path:
    (tmp / "media").mkdir(exist_ok=True)
    path = tmp / "rows.csv"
    path.write_text(text)
    return path


UNCONDITIONAL = "id,video_path,caption,video_exist,text_exist\nu,,,0,0\n"


def p_missing_checkpoint(tmp: Path, _s: Shared) -> Built:
    csv = infer_csv(tmp, UNCONDITIONAL)
    return Built(predict_args(tmp, csv, tmp / "no_such.pth"), tmp / "out")


def p_evil_checkpoint(tmp: Path, _s: Shared) -> Built:
    csv = infer_csv(tmp, UNCONDITIONAL)
    marker = tmp / "PWNED_predict"
    ckpt = evil_pickle(tmp / "evil.pth", marker, wrap=lambda p: {"model": p})
    return Built(predict_args(tmp, csv, ckpt), tmp / "out", marker=marker)


def p_checkpoint_is_a_directory(tmp: Path, _s: Shared) -> Built:
    csv = infer_csv(tmp, UNCONDITIONAL)
    (tmp / "run").mkdir()
    return Built(predict_args(tmp, csv, tmp / "run"), tmp / "out")


def p_missing_column(tmp: Path, s: Shared) -> Built:
    csv = infer_csv(tmp, "id,video_path,caption,video_exist\nu,,,0\n")
    return Built(predict_args(tmp, csv, s.predict_ckpt), tmp / "out")


def p_dotdot_id(tmp: Path, s: Shared) -> Built:
    """Allowed by the predict job's name rule: '../evil' is written as out/evil.wav, never outside."""
    csv = infer_csv(tmp, "id,video_path,caption,video_exist,text_exist\n../evil,,,0,0\n")

    def check() -> None:
        written = sorted(p.name for p in (tmp / "out").iterdir())
        assert written == ["evil.wav", "summary.csv"], written

    return Built(predict_args(tmp, csv, s.predict_ckpt), tmp / "out", check=check)


def p_truncated_video(tmp: Path, s: Shared) -> Built:
    media = tmp / "media"
    whole = write_video(tmp / "whole.mp4", seconds=1.2)
    truncated_copy(whole, media / "trunc.mp4", 0.3)
    whole.unlink()
    csv = infer_csv(tmp, "id,video_path,caption,video_exist,text_exist\ntrunc,trunc.mp4,,1,0\n")

    def check() -> None:
        summary = pd.read_csv(tmp / "out" / "summary.csv", dtype=str, keep_default_na=False)
        assert summary[["id", "status"]].values.tolist() == [["trunc", "failed"]]
        assert "trunc.mp4" in summary.loc[0, "reason"], summary.loc[0, "reason"]

    return Built(predict_args(tmp, csv, s.predict_ckpt), tmp / "out", check=check)


def p_unwritable_out(tmp: Path, s: Shared) -> Built:
    csv = infer_csv(tmp, UNCONDITIONAL)
    out = unwritable_out(tmp)
    return Built(predict_args(tmp, csv, s.predict_ckpt, out), out)


def p_zero_steps(tmp: Path, s: Shared) -> Built:
    csv = infer_csv(tmp, UNCONDITIONAL)
    return Built(predict_args(tmp, csv, s.predict_ckpt, None, "sampling.num_steps=0"), tmp / "out")


def p_negative_batch(tmp: Path, s: Shared) -> Built:
    csv = infer_csv(tmp, UNCONDITIONAL)
    return Built(predict_args(tmp, csv, s.predict_ckpt, None, "inference.batch_size=-1"), tmp / "out")


def p_csv_is_directory(tmp: Path, s: Shared) -> Built:
    (tmp / "media").mkdir()
    (tmp / "rows_dir.csv").mkdir()
    return Built(predict_args(tmp, tmp / "rows_dir.csv", s.predict_ckpt), tmp / "out")


# ------------------------------------------------------------------------------ evaluate
def eval_layout(tmp: Path, reference_columns: tuple[str, ...] = ("id", "audio_path")) -> tuple[Path, Path]:
    gen, ref = tmp / "gen", tmp / "ref"
    write_wav(gen / "a.wav", sine(300.0, 1.0, SR), SR)
    write_wav(ref / "a.wav", sine(300.0, 1.0, SR), SR)
    row = {"id": "a", "audio_path": "ref/a.wav"}
    reference = tmp / "reference.csv"
    pd.DataFrame([{k: row[k] for k in reference_columns}]).to_csv(reference, index=False)
    return gen, reference


def eval_args(gen: Path, reference: Path, out: Path, *extra: str) -> list[str]:
    return ["--generated", str(gen), "--reference", str(reference), "--out", str(out), "metrics.enabled=[]", *extra]


def v_generated_missing(tmp: Path, _s: Shared) -> Built:
    _, reference = eval_layout(tmp)
    return Built(eval_args(tmp / "no_such_dir", reference, tmp / "out"), tmp / "out")


def v_generated_is_a_file(tmp: Path, _s: Shared) -> Built:
    gen, reference = eval_layout(tmp)
    return Built(eval_args(gen / "a.wav", reference, tmp / "out"), tmp / "out")


def v_reference_missing_column(tmp: Path, _s: Shared) -> Built:
    gen, reference = eval_layout(tmp, ("id",))
    return Built(eval_args(gen, reference, tmp / "out"), tmp / "out")


def v_reference_duplicate_id(tmp: Path, _s: Shared) -> Built:
    gen, reference = eval_layout(tmp)
    reference.write_text(reference.read_text() + "a,ref/a.wav\n")
    return Built(eval_args(gen, reference, tmp / "out"), tmp / "out")


def v_generated_wav_is_text(tmp: Path, _s: Shared) -> Built:
    """A pair whose generated clip does not decode: written up in metrics.json, exit 1, named last."""
    gen, reference = eval_layout(tmp)
    (gen / "a.wav").write_text("not audio\n")

    def check() -> None:
        assert "'a'" in (tmp / "out" / "metrics.json").read_text().replace('"a"', "'a'")

    return Built(eval_args(gen, reference, tmp / "out"), tmp / "out", check=check)


def v_missing_argument(tmp: Path, _s: Shared) -> Built:
    _, reference = eval_layout(tmp)
    return Built(["--reference", str(reference), "--out", str(tmp / "out")], tmp / "out")


def v_bad_duration(tmp: Path, _s: Shared) -> Built:
    gen, reference = eval_layout(tmp)
    return Built(eval_args(gen, reference, tmp / "out", "data.audio_duration=-1"), tmp / "out")


# ---------------------------------------------------------------------- demo, data, report
def d_args(tmp: Path, *extra: str) -> Built:
    return Built([f"demo.out_dir={tmp / 'out'}", *extra], tmp / "out")


def d_negative_n(tmp: Path, _s: Shared) -> Built:
    return d_args(tmp, "demo.n=-1")


def d_unknown_dataset(tmp: Path, _s: Shared) -> Built:
    return d_args(tmp, "demo.dataset=no_such_set")


def d_bad_fraction(tmp: Path, _s: Shared) -> Built:
    return d_args(tmp, "demo.holdout_frac=1.5")


def m_args(tmp: Path, *extra: str) -> Built:
    return Built(["--out", str(tmp / "out"), *extra], tmp / "out")


def m_negative_n(tmp: Path, _s: Shared) -> Built:
    return m_args(tmp, "--n", "-5")


def m_negative_duration(tmp: Path, _s: Shared) -> Built:
    return m_args(tmp, "--n", "2", "--duration", "-1")


def m_not_a_number(tmp: Path, _s: Shared) -> Built:
    return m_args(tmp, "--n", "many")


def m_out_is_a_file(tmp: Path, _s: Shared) -> Built:
    target = tmp / "out"
    target.write_text("a file, not a folder\n")
    return Built(["--out", str(target), "--n", "2", "--duration", "1"], tmp / "out_never")


def r_csv_is_directory(tmp: Path, _s: Shared) -> Built:
    (tmp / "feats.csv").mkdir()
    return Built(["--csv", str(tmp / "feats.csv")], tmp / "out")


def r_csv_is_binary(tmp: Path, _s: Shared) -> Built:
    (tmp / "feats.csv").write_bytes(bytes(range(256)) * 8)
    return Built(["--csv", str(tmp / "feats.csv")], tmp / "out")


def r_evil_feature_file(tmp: Path, _s: Shared) -> Built:
    marker = tmp / "PWNED_report"
    evil_pickle(tmp / "f" / "x.pth", marker, wrap=lambda p: {"text_features": p})
    csv = tmp / "feats.csv"
    csv.write_text(f"id,audio_path,features_path,video_exist,text_exist\nx,a.wav,{tmp / 'f' / 'x.pth'},0,1\n")
    # --write-stats: empty statistics must not land beside the features (the snapshot sees them)
    return Built(["--csv", str(csv), "--write-stats"], tmp / "out", marker=marker)


# --------------------------------------------------------------------------------- cases
def _c(id: str, job: str, build, code: int, last: Optional[str], xfail: str = "") -> object:
    marks = (pytest.mark.xfail(strict=True, reason=xfail),) if xfail else ()
    return pytest.param(Case(id, job, build, code, last), id=id, marks=marks)


CASES = [
    # extract: media rows fail and are named; CSV / config / output problems stop the run
    _c("extract-text-as-wav", "extract", x_text_as_wav, 1, r"'textwav'.*text\.wav"),
    _c("extract-empty-wav", "extract", x_empty_wav, 1, r"'emptywav'.*empty\.wav"),
    _c("extract-empty-wav-within-policy", "extract", x_empty_wav_within_policy, 0, None),
    _c("extract-truncated-mp4", "extract", x_truncated_mp4, 1, r"'trunc'.*trunc\.mp4"),
    _c("extract-garbage-mp4", "extract", x_corrupt_mp4, 1, r"'garbage'.*garbage\.mp4"),
    _c("extract-mp4-without-video", "extract", x_mp4_without_video, 1, r"'novideo'.*novideo\.mp4.*no video stream"),
    _c("extract-missing-column", "extract", x_missing_column, 3, r"input\.csv.*missing column\(s\) video_path"),
    _c("extract-duplicate-id", "extract", x_duplicate_ids, 3, r"input\.csv.*'good0'.*duplicate id"),
    _c("extract-dotdot-id", "extract", x_dotdot_id, 3, r"input\.csv.*'\.\./evil'"),
    _c("extract-path-outside-root", "extract", x_path_outside_root, 1, r"'climber'.*outside data\.data_root"),
    _c("extract-negative-audio-duration", "extract", x_negative_duration, 2, r"data\.audio_duration.*-1"),
    _c("extract-negative-extraction-duration", "extract", x_negative_extraction_duration, 2,
       r"extraction\.duration_sec.*-2"),
    _c("extract-huge-batch-size", "extract", x_huge_batch, 2, r"extraction\.batch_size.*1000000000000"),
    _c("extract-huge-duration", "extract", x_huge_duration, 2, r"extraction\.duration_sec"),
    _c("extract-csv-is-a-directory", "extract", x_csv_is_directory, 3, r"input_dir\.csv.*directory"),
    _c("extract-unwritable-output", "extract", x_unwritable_out, 4, r"(blocker|readonly)"),
    # train
    _c("train-nan-features", "train", t_nan_features, 1, r"'vt2a_3'.*vt2a_3\.pth.*sync_features.*non-finite"),
    _c("train-inf-features", "train", t_inf_features, 1, r"'vt2a_3'.*vt2a_3\.pth.*sync_features.*non-finite"),
    _c("train-wrong-shape-on-bad-row-error", "train", t_wrong_shape_error_policy, 3,
       r"data\.on_bad_row=error.*'t2a_1'.*text_features has shape \(5, 7\)"),
    _c("train-evil-feature-pickle", "train", t_evil_feature_file, 1, r"'v2a_2'.*v2a_2\.pth.*could not be loaded"),
    _c("train-evil-resume-pickle", "train", t_evil_resume_checkpoint, 3, r"checkpoint_latest\.pth.*weights-only"),
    _c("train-missing-column", "train", t_missing_columns, 3, r"train\.csv.*missing column\(s\) features_path"),
    _c("train-duplicate-id", "train", t_duplicate_ids, 1, r"'vt2a_0'.*duplicate id"),
    _c("train-dotdot-id", "train", t_dotdot_id, 1, r"'\.\./escape'.*unsafe"),
    _c("train-path-outside-root", "train", t_path_outside_root, 1, r"'t2a_1'.*outside data\.data_root"),
    _c("train-negative-duration", "train", t_negative_duration, 2, r"data\.audio_duration.*-1"),
    _c("train-huge-duration", "train", t_huge_duration, 2, r"data\.audio_duration=1000000000000\.0 s.*at most 600 s"),
    _c("train-csv-is-a-directory", "train", t_csv_is_directory, 3, r"folder\.csv.*directory"),
    _c("train-unwritable-output", "train", t_unwritable_out, 4, r"(blocker|readonly)"),
    _c("train-every-audio-unreadable", "train", t_every_audio_unreadable, 1, r"'vt2a_0'.*vt2a_0\.wav.*could not be read"),
    _c("train-resume-other-preset", "train", t_resume_other_preset, 3,
       r"checkpoint_latest\.pth.*does not fit model preset 'tiny_16k'"),
    # predict
    _c("predict-missing-checkpoint", "predict", p_missing_checkpoint, 3, r"no_such\.pth"),
    _c("predict-evil-checkpoint", "predict", p_evil_checkpoint, 3, r"evil\.pth.*weights-only"),
    _c("predict-checkpoint-is-a-directory", "predict", p_checkpoint_is_a_directory, 3, r"model\.ckpt_path=.*run"),
    _c("predict-missing-column", "predict", p_missing_column, 3, r"rows\.csv.*missing column\(s\) text_exist"),
    _c("predict-dotdot-id", "predict", p_dotdot_id, 0, None),
    _c("predict-truncated-video", "predict", p_truncated_video, 1, r"1 of 1 row\(s\) failed; first: 'trunc'.*summary\.csv"),
    _c("predict-unwritable-output", "predict", p_unwritable_out, 4, r"(blocker|readonly)"),
    _c("predict-zero-steps", "predict", p_zero_steps, 2, r"sampling\.num_steps.*0"),
    _c("predict-negative-batch-size", "predict", p_negative_batch, 2, r"inference\.batch_size.*-1"),
    _c("predict-csv-is-a-directory", "predict", p_csv_is_directory, 3, r"rows_dir\.csv.*directory"),
    # evaluate
    _c("evaluate-generated-missing", "evaluate", v_generated_missing, 3, r"no_such_dir"),
    _c("evaluate-generated-is-a-file", "evaluate", v_generated_is_a_file, 3, r"a\.wav.*not a folder"),
    _c("evaluate-reference-missing-column", "evaluate", v_reference_missing_column, 3,
       r"reference\.csv.*missing column\(s\) audio_path"),
    _c("evaluate-reference-duplicate-id", "evaluate", v_reference_duplicate_id, 3, r"reference\.csv.*duplicate id 'a'"),
    _c("evaluate-generated-wav-is-text", "evaluate", v_generated_wav_is_text, 1, r"'a'.*gen/a\.wav"),
    _c("evaluate-missing-argument", "evaluate", v_missing_argument, 2, r"--generated"),
    _c("evaluate-negative-duration", "evaluate", v_bad_duration, 2, r"data\.audio_duration.*-1"),
    # the demo and its data set
    _c("demo-negative-n", "demo", d_negative_n, 2, r"demo\.n.*-1"),
    _c("demo-unknown-dataset", "demo", d_unknown_dataset, 2, r"demo\.dataset.*no_such_set"),
    _c("demo-bad-fraction", "demo", d_bad_fraction, 2, r"demo\.holdout_frac.*1\.5"),
    _c("make-dataset-negative-n", "make_dataset", m_negative_n, 2, r"--n.*-5"),
    _c("make-dataset-negative-duration", "make_dataset", m_negative_duration, 2, r"--duration.*-1"),
    _c("make-dataset-n-not-a-number", "make_dataset", m_not_a_number, 2, r"--n.*many"),
    _c("make-dataset-out-is-a-file", "make_dataset", m_out_is_a_file, 4, r"out"),
    # the feature report
    _c("report-csv-is-a-directory", "features.report", r_csv_is_directory, 3, r"feats\.csv.*directory"),
    _c("report-csv-is-binary", "features.report", r_csv_is_binary, 3, r"feats\.csv"),
    _c("report-evil-feature-file", "features.report", r_evil_feature_file, 1, r"feats\.csv.*'x'.*x\.pth.*weights-only"),
]


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Shared:
    from tests.test_predict import save_checkpoints, tiny_cfg
    from wavflow.config import load_config
    from wavflow.model import build_model_from_config

    root = tmp_path_factory.mktemp("hostile_shared")
    paths = save_checkpoints(root / "predict", tiny_cfg())
    # A full training checkpoint of a small_16k run (another preset than the tests' tiny_16k).
    small = build_model_from_config(load_config("train.yaml", ["model.name=small_16k", "data.audio_duration=0.2"]))
    state = {k: v.clone() for k, v in small.state_dict().items()}
    small_ckpt = root / "small" / "checkpoint_latest.pth"
    small_ckpt.parent.mkdir()
    torch.save({"model": state, "model_ema1": state, "model_ema2": state, "epoch": 1, "global_step": 4}, small_ckpt)
    # The hostile payload is live: an unsafe load runs it (so the marker checks below can fail).
    marker = root / "PWNED_selftest"
    torch.load(evil_pickle(root / "selftest.pth", marker), weights_only=False)
    assert marker.exists()
    return Shared(root=root, predict_ckpt=paths["full"], small_ckpt=small_ckpt)


def _snapshot(root: Path, skip: Path) -> dict[str, tuple]:
    """Every path under root except the output folder: (is dir, size, mtime_ns)."""
    found: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if here / d != skip]
        for name in dirnames + filenames:
            path = here / name
            if path == skip:
                continue
            st = path.lstat()
            found[str(path.relative_to(root))] = (stat.S_ISDIR(st.st_mode), st.st_size if not stat.S_ISDIR(st.st_mode) else 0,
                                                  st.st_mtime_ns)
    return found


def _partial_files(root: Path) -> list[str]:
    return [str(p.relative_to(root)) for p in root.rglob("*") if PARTIAL.search(p.name)]


@pytest.mark.parametrize("case", CASES)
def test_hostile_input(case: Case, shared: Shared, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                       capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture,
                       wavflow_cache_dir: Path) -> None:
    from wavflow.features import extract

    work = tmp_path / "case"
    work.mkdir()
    monkeypatch.chdir(work)  # relative defaults land in the case's folder
    monkeypatch.setattr(extract, "build_encoders", lambda *a, need_video, **k: FakeEncoders(need_video=need_video))
    built = case.build(work, shared)
    before = _snapshot(work, built.out)
    capsys.readouterr()
    try:
        code = _main(case.job)(built.argv)
    except SystemExit as exc:  # a job must return its code, never exit from inside main()
        code = f"SystemExit({exc.code})"
    finally:
        if not IS_ROOT:  # let pytest clean up a read-only folder
            for path in work.rglob("*"):
                if path.is_dir() and not path.is_symlink():
                    path.chmod(0o755)
    out, err = capsys.readouterr()
    text = out + err + caplog.text
    lines = [line for line in err.splitlines() if line.strip()]
    last = lines[-1] if lines else ""

    assert "Traceback" not in text, f"a traceback means an input was not validated:\n{text[-4000:]}"
    assert code == case.code, f"exit {code}, expected {case.code}; last line: {last}"
    if case.last is not None:
        assert last.startswith(f"[wavflow.{case.job}] error: "), f"last stderr line: {last!r}"
        assert re.search(case.last, last), f"{case.last!r} not in the last line: {last!r}"
    else:
        assert f"[wavflow.{case.job}] error:" not in err, err[-2000:]
    if built.check is not None:
        built.check()
    if built.marker is not None:
        assert not built.marker.exists(), "a hostile pickle ran code while loading"
    after = _snapshot(work, built.out)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert not changed, f"written outside the output folder {built.out}: {changed}"
    assert not _partial_files(work), f"partial files left: {_partial_files(work)}"
