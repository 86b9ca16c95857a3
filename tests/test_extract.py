"""The extraction job in one process: validation, CSV/merge/resume logic, batching, error rows.

Multi-process (2-rank torchrun) runs are in test_extract_distributed.py.
"""

from __future__ import annotations

import csv
import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from tests.media import write_corrupt_video, write_video, write_wav, sine
from wavflow.config import load_config
from wavflow.errors import ConfigError, ManifestError
from wavflow.features import extract
from wavflow.features.extract_outputs import OutputPaths, RankOutputs, merge_outputs
from wavflow.features.extract_plan import SOURCE_KEY, ExtractSettings, expected_feature_shapes, feature_file_problem, plan_rows
from wavflow.manifest import TRAIN_COLUMNS

SHORT = ["extraction.duration_sec=2", "data.clip_seq_len=16", "data.sync_seq_len=40"]
SR = 16000


# ----------------------------------------------------------------------------- data helpers
def ramp_video(path: Path, base: int, seconds: float = 2.0) -> Path:
    """Flat frames whose grey level rises by 2 per frame from `base`: every frame and every
    video differs, so a mix-up of frames, segments or rows shows in the features."""
    return write_video(
        path, seconds=seconds, fps=25, size=(96, 64),
        frame_fn=lambda t: np.full((64, 96, 3), min(255, base + 2 * int(round(t * 25))), np.uint8),
    )


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def write_dataset(root: Path, *, videos: bool, n: int = 3, corrupt: bool = False, short: bool = False) -> dict[str, Any]:
    """n good rows (row 1 has an empty caption, row 0 a caption with a comma) under root/data,
    plus optional corrupt-video and too-short rows and one row whose audio file is missing."""
    data = root / "data"
    rows = []
    for i in range(n):
        write_wav(data / f"a{i}.wav", sine(220.0 * (i + 1), 2.0, SR), SR)
        caption = ["a dog barks, twice", "", "rain on a roof"][i % 3]
        rows.append([f"clip{i}", f"a{i}.wav", f"v{i}.mp4", caption])
        if videos:
            ramp_video(data / f"v{i}.mp4", base=20 + 40 * i)
    bad = []
    if corrupt:
        write_corrupt_video(data / "corrupt.mp4")
        rows.append(["corrupt", "a0.wav", "corrupt.mp4", "noise"])
        bad.append("corrupt")
    if short:
        ramp_video(data / "short.mp4", base=30, seconds=1.0)
        rows.append(["short", "a0.wav", "short.mp4", "too short"])
        bad.append("short")
    rows.append(["noaudio", "missing.wav", "v0.mp4", "lost audio"])
    bad.append("noaudio")
    header = ["id", "audio_path", "video_path", "caption"]
    if not videos:
        header = ["id", "audio_path", "caption"]
        rows = [[r[0], r[1], r[3]] for r in rows]
    csv_path = write_csv(data / "input.csv", header, rows)
    good = [f"clip{i}" for i in range(n)]
    return {"csv": csv_path, "data": data, "good": good, "bad": bad, "ids": [r[0] for r in rows], "rows": rows}


def overrides(root: Path, ds: dict[str, Any], mode: str, *extra: str) -> list[str]:
    return [
        f"extraction.mode={mode}",
        "encoders.profile=tiny",
        f"data.csv_path={ds['csv']}",
        f"data.data_root={ds['data']}",
        f"output.pth_dir={root / 'out' / 'pth'}",
        f"output.csv_path={root / 'out' / 'train.csv'}",
        "extraction.num_workers=0",
        *SHORT,
        *extra,
    ]


def config(root: Path, ds: dict[str, Any], mode: str, *extra: str):
    return load_config(f"extract_{mode}.yaml", overrides(root, ds, mode, *extra), validate=False)


def read_out_csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def read_errors(path: Path) -> dict[str, str]:
    return dict(line.split("\t", 1) for line in path.read_text().splitlines() if line)


class FakeEncoders:
    """Stand-in encoders whose outputs are simple functions of the inputs (checked below)."""

    def __init__(self, need_video: bool, fail_caption: str | None = None) -> None:
        self.need_video = need_video
        self.fail_caption = fail_caption
        self.text_batches: list[list[str]] = []

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        self.text_batches.append(list(texts))
        if self.fail_caption in texts:
            raise RuntimeError("boom")
        return torch.stack([torch.full((77, 1024), float(len(t))) for t in texts])

    def encode_clip_frames(self, frames: torch.Tensor) -> torch.Tensor:
        return frames.mean(dim=(2, 3, 4))[..., None].expand(-1, -1, 1024).clone()

    def encode_sync(self, segments: torch.Tensor) -> torch.Tensor:
        b, s = segments.shape[:2]
        per_frame = segments.mean(dim=(3, 4, 5))  # (B, S, 16)
        tokens = per_frame.reshape(b, s, 8, 2).mean(-1)  # one token per 2-frame tubelet
        return tokens.reshape(b, 8 * s, 1).expand(-1, -1, 768).clone()

    def empty_string_feature(self) -> torch.Tensor:
        return torch.zeros(77, 1024)


@pytest.fixture
def never_build(monkeypatch: pytest.MonkeyPatch) -> list:
    calls: list = []

    def refuse(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        raise AssertionError("encoders must not be built here")

    monkeypatch.setattr(extract, "build_encoders", refuse)
    return calls


# ------------------------------------------------------------------------- config checks
def test_duration_must_match_sequence_lengths(tmp_path: Path) -> None:
    ds = write_dataset(tmp_path, videos=False, n=1)
    cfg = load_config("extract_vt2a.yaml", [f"data.csv_path={ds['csv']}", "extraction.duration_sec=2"], validate=False)
    with pytest.raises(ConfigError) as err:
        ExtractSettings.from_config(cfg)
    msg = str(err.value)
    assert "data.clip_seq_len=16" in msg and "data.sync_seq_len=40" in msg and "extraction.duration_sec=2.0" in msg
    # T2A does not decode video, so the duration does not matter there.
    cfg = load_config("extract_t2a.yaml", [f"data.csv_path={ds['csv']}", "extraction.duration_sec=2"], validate=False)
    assert ExtractSettings.from_config(cfg).mode == "t2a"


def test_bad_config_values_exit_2(tmp_path: Path, never_build: list, capsys: pytest.CaptureFixture) -> None:
    ds = write_dataset(tmp_path, videos=False, n=1)
    rc = extract.main(["--config", "extract_t2a.yaml", *overrides(tmp_path, ds, "t2a", "extraction.mode=a2t")])
    assert rc == 2
    assert "extraction.mode" in capsys.readouterr().err
    assert not never_build


# ------------------------------------------------------------- validation before any model
@pytest.mark.parametrize(
    "case, expect",
    [
        ("missing_column", "missing column(s) caption"),
        ("duplicate_id", "duplicate id (first on line 2)"),
        ("unsafe_id", "'../evil'"),
    ],
)
def test_fatal_csv_problems_are_reported_before_models(
    tmp_path: Path, never_build: list, capsys: pytest.CaptureFixture, case: str, expect: str
) -> None:
    ds = write_dataset(tmp_path, videos=True, n=2)
    header, rows = ["id", "audio_path", "video_path", "caption"], [list(r) for r in ds["rows"]]
    if case == "missing_column":
        header, rows = header[:3], [r[:3] for r in rows]
    elif case == "duplicate_id":
        rows[1][0] = rows[0][0]
    else:
        rows[1][0] = "../evil"
    write_csv(ds["csv"], header, rows)
    rc = extract.main(["--config", "extract_vt2a.yaml", *overrides(tmp_path, ds, "vt2a")])
    err = capsys.readouterr().err
    assert rc == 3  # bad input
    assert expect in err
    if case != "missing_column":  # one report: the missing audio of the last row is in it too
        assert "audio_path not found" in err and str(ds["csv"]) in err
    assert not never_build, "encoders were built although the CSV was rejected"
    assert not (tmp_path / "out").exists(), "nothing may be written for a rejected CSV"
    assert not (tmp_path / "evil.pth").exists()


def test_strict_paths_makes_missing_files_fatal(tmp_path: Path, never_build: list) -> None:
    ds = write_dataset(tmp_path, videos=False, n=2)
    settings = ExtractSettings.from_config(config(tmp_path, ds, "t2a", "extraction.strict_paths=true"))
    with pytest.raises(ManifestError, match=r"line 4 \(id 'noaudio'\): audio_path not found"):
        plan_rows(settings)
    lenient = plan_rows(ExtractSettings.from_config(config(tmp_path, ds, "t2a")))
    assert [r.problem is not None for r in lenient] == [False, False, True]
    assert all(r.audio_path.is_absolute() for r in lenient)


# ------------------------------------------------------------------------ merge of parts
def test_merge_orders_rows_by_input_dedups_and_deletes_parts(tmp_path: Path) -> None:
    paths = OutputPaths(tmp_path / "feats" / "train.csv")
    ids = ["a", "b", "c", "d", "e"]
    with RankOutputs(paths, 0, flush_every=1) as r0:
        r0.add_row("c", Path("/x/c.wav"), Path("/f/c.pth"), 1, 1)
        r0.add_row("a", Path("/x/a.wav"), Path("/f/a.pth"), 1, 0)
        r0.add_error("e", "video skipped:\ttoo\nshort")
    with RankOutputs(paths, 1, flush_every=10) as r1:
        r1.add_row("b", Path("/x/b.wav"), Path("/f/b.pth"), 1, 1)
        r1.add_row("a", Path("/x/other.wav"), Path("/f/a2.pth"), 1, 1)  # duplicate: first wins
        r1.add_error("d", "audio_path not found: /x/d.wav")
    result = merge_outputs(paths, 2, ids)
    df = read_out_csv(paths.csv_path)
    assert tuple(df.columns) == TRAIN_COLUMNS
    assert df["id"].tolist() == ["a", "b", "c"]
    assert df.loc[0, "audio_path"] == "/x/a.wav" and df.loc[0, "text_exist"] == "0"
    assert paths.errors_log.read_text() == "d\taudio_path not found: /x/d.wav\ne\tvideo skipped: too short\n"
    assert (result.rows, result.errors) == (3, 2)
    assert sorted(p.name for p in paths.directory.iterdir()) == ["train.csv", "train_errors.log"]


def test_merge_names_a_missing_rank_part(tmp_path: Path) -> None:
    paths = OutputPaths(tmp_path / "train.csv")
    with RankOutputs(paths, 0, flush_every=1):
        pass
    with pytest.raises(ManifestError, match="train_rank1.csv is missing"):
        merge_outputs(paths, 2, ["a"])


# ---------------------------------------------------------- VT2A batching with stand-ins
def test_vt2a_batches_map_features_to_the_right_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from wavflow.video import decode_video

    ds = write_dataset(tmp_path, videos=True, n=3, corrupt=True, short=True)
    built: list[FakeEncoders] = []

    def fake_build(encoders_cfg: Any, *, need_video: bool, device: torch.device) -> FakeEncoders:
        built.append(FakeEncoders(need_video))
        return built[-1]

    monkeypatch.setattr(extract, "build_encoders", fake_build)
    # batch_size 2 puts the corrupt and short clips in batches with good ones.
    result = extract.run_extraction(config(tmp_path, ds, "vt2a", "extraction.batch_size=2"))
    assert (result.done, result.skipped, result.failed, result.rows) == (3, 0, 3, 3)
    assert len(built) == 1 and built[0].need_video

    pth = tmp_path / "out" / "pth"
    for i, sample_id in enumerate(ds["good"]):
        feats = torch.load(pth / f"{sample_id}.pth", weights_only=True)
        assert set(feats) == {"clip_features", "sync_features", "text_features", SOURCE_KEY}
        assert isinstance(feats[SOURCE_KEY], str) and len(feats[SOURCE_KEY]) == 64  # sha256 hex
        tensors = [v for k, v in feats.items() if k != SOURCE_KEY]
        assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in tensors)
        frames = decode_video(ds["data"] / f"v{i}.mp4", 2.0)
        # clip: one vector per CLIP frame (16 at 8 fps); sync: 5 segments x 8 tubelets = 40.
        want_clip = frames.clip.mean(dim=(1, 2, 3))
        torch.testing.assert_close(feats["clip_features"][:, 0], want_clip)
        per_frame = frames.sync.mean(dim=(1, 2, 3))  # 50 frames
        want_sync = torch.stack(
            [per_frame[8 * s + 2 * k: 8 * s + 2 * k + 2].mean() for s in range(5) for k in range(8)]
        )
        torch.testing.assert_close(feats["sync_features"][:, 0], want_sync)
        caption = ds["rows"][i][3]
        torch.testing.assert_close(feats["text_features"], torch.full((77, 1024), float(len(caption))))

    df = read_out_csv(result.csv_path)
    assert df["id"].tolist() == ds["good"]
    assert df["text_exist"].tolist() == ["1", "0", "1"]  # row 1 has an empty caption
    assert df["video_exist"].tolist() == ["1", "1", "1"]
    assert df["features_path"].tolist() == [str(pth / f"{i}.pth") for i in ds["good"]]
    errors = read_errors(result.errors_log)
    assert list(errors) == ["corrupt", "short", "noaudio"]  # input order
    assert "could not be opened" in errors["corrupt"] or "could not be decoded" in errors["corrupt"]
    assert "too short" in errors["short"] and "audio_path not found" in errors["noaudio"]
    assert torch.equal(torch.load(pth / "empty_string.pt", weights_only=True), torch.zeros(77, 1024))
    log = (pth / "extract_vt2a_rank0.log").read_text()
    assert "[WARNING][Rank 0]" in log and "[SKIP] corrupt" in log
    summary = json.loads(result.summary_path.read_text())
    assert (summary["done"], summary["skipped"], summary["failed"], summary["csv_rows"]) == (3, 0, 3, 3)


def test_failing_batch_is_retried_per_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ds = write_dataset(tmp_path, videos=False, n=3)
    fake = FakeEncoders(need_video=False, fail_caption="rain on a roof")
    monkeypatch.setattr(extract, "build_encoders", lambda *a, **k: fake)
    result = extract.run_extraction(config(tmp_path, ds, "t2a", "extraction.batch_size=3"))
    assert (result.done, result.failed) == (2, 2)
    assert read_out_csv(result.csv_path)["id"].tolist() == ["clip0", "clip1"]
    assert read_errors(result.errors_log)["clip2"] == "encode failed (RuntimeError: boom)"
    # the whole batch first, then one row at a time; the empty caption is encoded as ""
    assert fake.text_batches[0] == ["a dog barks, twice", "", "rain on a roof"]
    assert fake.text_batches[1:4] == [["a dog barks, twice"], [""], ["rain on a roof"]]


def test_every_row_failing_exits_1(tmp_path: Path, never_build: list) -> None:
    data = tmp_path / "data"
    csv_path = write_csv(data / "input.csv", ["id", "audio_path", "caption"], [["x", "nope.wav", "c"]])
    ds = {"csv": csv_path, "data": data}
    rc = extract.main(["--config", "extract_t2a.yaml", *overrides(tmp_path, ds, "t2a")])
    assert rc == 1
    out = tmp_path / "out"
    assert read_out_csv(out / "train.csv").empty and tuple(read_out_csv(out / "train.csv").columns) == TRAIN_COLUMNS
    assert list(read_errors(out / "train_errors.log")) == ["x"]
    assert not never_build and not (out / "pth" / "empty_string.pt").exists()


@pytest.mark.parametrize("mode", ["t2a", "vt2a"])
def test_audio_that_does_not_decode_is_a_failed_row_and_breaks_the_policy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, mode: str
) -> None:
    """A text file posing as a wav is not `done`: its row fails with the decoder's reason, and
    1 failed row of 4 is above data.max_failed_fraction's default (exit 1, the id named last)."""
    ds = write_dataset(tmp_path, videos=mode == "vt2a", n=3)
    (ds["data"] / "a1.wav").write_text("this is not audio\n")
    (ds["data"] / "a2.wav").write_bytes(b"")  # an empty file: no header, no samples
    monkeypatch.setattr(extract, "build_encoders", lambda *a, **k: FakeEncoders(need_video=mode == "vt2a"))
    rc = extract.main(["--config", f"extract_{mode}.yaml", *overrides(tmp_path, ds, mode)])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 1, last
    assert last.startswith("[wavflow.extract] error: 3 of 4 rows of the input CSV failed") and "'clip1'" in last
    assert "train_errors.log" in last and "data.max_failed_fraction" in last
    out = tmp_path / "out"
    assert read_out_csv(out / "train.csv")["id"].tolist() == ["clip0"]
    errors = read_errors(out / "train_errors.log")
    assert list(errors) == ["clip1", "clip2", "noaudio"]
    assert errors["clip1"].startswith("audio skipped: audio file") and "could not be opened" in errors["clip1"]
    assert "a2.wav" in errors["clip2"]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["failed"] == 3 and summary["failed_rows_within_policy"] is False
    # the same failures within a looser policy: exit 0, the same outputs
    rc = extract.main(["--config", f"extract_{mode}.yaml", *overrides(tmp_path, ds, mode, "data.max_failed_fraction=0.8")])
    assert rc == 0 and read_out_csv(out / "train.csv")["id"].tolist() == ["clip0"]
    log = (out / "pth" / f"extract_{mode}_rank0.log").read_text()  # the end of the job names them too
    assert "3 row(s) failed (data.max_failed_fraction=0.8): 'clip1': audio skipped: " in log


@pytest.mark.parametrize("override", ["data.max_failed_fraction=1.0", "data.max_failed_fraction=-0.1",
                                      "data.max_failed_fraction=lots", "data.audio_duration=-1",
                                      "data.audio_duration=0"])
def test_bad_values_are_named_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture, never_build: list,
                                              override: str) -> None:
    ds = write_dataset(tmp_path, videos=True, n=1)
    rc = extract.main(["--config", "extract_vt2a.yaml", *overrides(tmp_path, ds, "vt2a", override)])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and last.startswith("[wavflow.extract] error: ") and override.split("=")[0] in last, last
    assert not never_build and not (tmp_path / "out" / "train.csv").exists()


# --------------------------------------------- T2A with the real tiny encoders + resume
def test_t2a_real_tiny_encoders_then_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, wavflow_cache_dir: Path
) -> None:
    ds = write_dataset(tmp_path, videos=False, n=3)
    real_build = extract.build_encoders
    built: list[tuple[bool, Any]] = []

    def spy(encoders_cfg: Any, *, need_video: bool, device: torch.device) -> Any:
        enc = real_build(encoders_cfg, need_video=need_video, device=device)
        built.append((need_video, enc))
        return enc

    monkeypatch.setattr(extract, "build_encoders", spy)
    cfg = config(tmp_path, ds, "t2a", "extraction.batch_size=2")
    first = extract.run_extraction(cfg)
    assert (first.done, first.skipped, first.failed, first.rows) == (3, 0, 1, 3)
    assert len(built) == 1 and built[0][0] is False, "T2A must not ask for Synchformer"
    enc = built[0][1]
    assert enc.synchformer is None

    pth = tmp_path / "out" / "pth"
    captions = ["a dog barks, twice", "", "rain on a roof"]
    for sample_id, caption in zip(ds["good"], captions):
        feats = torch.load(pth / f"{sample_id}.pth", weights_only=True)
        assert sorted(feats) == ["text_features", SOURCE_KEY]
        text = feats["text_features"]
        assert text.shape == (77, 1024) and text.dtype == torch.float32
        torch.testing.assert_close(text.norm(dim=-1), torch.ones(77))
        torch.testing.assert_close(text, enc.encode_text([caption])[0], atol=1e-5, rtol=1e-5)
    empty = torch.load(pth / "empty_string.pt", weights_only=True)
    assert empty.shape == (77, 1024) and empty.dtype == torch.float32
    torch.testing.assert_close(torch.load(pth / "clip1.pth", weights_only=True)["text_features"], empty)

    df = read_out_csv(first.csv_path)
    assert tuple(df.columns) == TRAIN_COLUMNS
    assert df["id"].tolist() == ds["good"]
    assert df["audio_path"].tolist() == [str(ds["data"] / f"a{i}.wav") for i in range(3)]
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in df["features_path"])
    assert df["video_exist"].tolist() == ["0", "0", "0"] and df["text_exist"].tolist() == ["1", "0", "1"]
    assert list(read_errors(first.errors_log)) == ["noaudio"]
    assert not list((tmp_path / "out").glob("train_rank*.csv")), "rank parts must be deleted after the merge"

    # Re-run: everything is skipped, no model is loaded, and every row is still listed.
    monkeypatch.setattr(extract, "build_encoders", lambda *a, **k: pytest.fail("re-run must not build encoders"))
    mtimes = {p.name: p.stat().st_mtime_ns for p in pth.glob("*.pth")}
    again = extract.run_extraction(cfg)
    assert (again.done, again.skipped, again.failed, again.rows) == (0, 3, 1, 3)
    assert read_out_csv(again.csv_path).equals(df)
    assert {p.name: p.stat().st_mtime_ns for p in pth.glob("*.pth")} == mtimes
    summary = json.loads(again.summary_path.read_text())
    assert (summary["done"], summary["skipped"], summary["failed"]) == (0, 3, 1)

    # A truncated .pth is redone; the others stay skipped.
    (pth / "clip2.pth").write_bytes((pth / "clip2.pth").read_bytes()[:100])
    monkeypatch.setattr(extract, "build_encoders", spy)
    third = extract.run_extraction(cfg)
    assert (third.done, third.skipped, third.failed) == (1, 2, 1)
    torch.testing.assert_close(
        torch.load(pth / "clip2.pth", weights_only=True)["text_features"], enc.encode_text([captions[2]])[0],
        atol=1e-5, rtol=1e-5,
    )
    assert read_out_csv(third.csv_path).equals(df)


# ------------------------------------------------- outputs must never overwrite the inputs
@pytest.mark.parametrize(
    "target, expect",
    [
        ("same", "output.csv_path"),
        ("errors", "the error log"),
        ("summary", "the summary"),
        ("rank_part", "per-rank file"),
    ],
)
def test_output_paths_that_hit_the_input_csv_are_rejected(
    tmp_path: Path, never_build: list, capsys: pytest.CaptureFixture, target: str, expect: str
) -> None:
    ds = write_dataset(tmp_path, videos=False, n=1)
    stem = ds["csv"].with_suffix("")  # .../data/input
    out_csv = {
        "same": ds["csv"],
        "errors": stem.parent / "train.csv",
        "summary": stem.parent / "train.csv",
        "rank_part": stem.parent / "train.csv",
    }[target]
    if target != "same":  # the input CSV carries the name of a sibling output of train.csv
        name = {"errors": "train_errors.log", "summary": "train_summary.json", "rank_part": "train_rank0.csv"}[target]
        ds["csv"] = ds["csv"].rename(stem.parent / name)
    before = ds["csv"].read_bytes()
    args = overrides(tmp_path, ds, "t2a", f"output.csv_path={out_csv}")
    with pytest.raises(ConfigError, match=expect):
        ExtractSettings.from_config(load_config("extract_t2a.yaml", args, validate=False))
    assert extract.main(["--config", "extract_t2a.yaml", *args]) == 2
    assert expect in capsys.readouterr().err
    assert ds["csv"].read_bytes() == before, "the input CSV was modified"
    assert not never_build and not (tmp_path / "out").exists()


def test_a_planned_pth_that_is_an_input_file_is_rejected(tmp_path: Path, never_build: list) -> None:
    ds = write_dataset(tmp_path, videos=False, n=2)
    # pth_dir is the media folder and clip1's audio file is called clip0.pth: writing clip0's
    # features would destroy clip1's audio.
    (ds["data"] / "a1.wav").rename(ds["data"] / "clip0.pth")
    rows = [list(r) for r in ds["rows"]]
    rows[1][1] = "clip0.pth"
    write_csv(ds["csv"], ["id", "audio_path", "caption"], rows)
    before = (ds["data"] / "clip0.pth").read_bytes()
    args = overrides(tmp_path, ds, "t2a", f"output.pth_dir={ds['data']}")
    settings = ExtractSettings.from_config(load_config("extract_t2a.yaml", args, validate=False))
    with pytest.raises(ConfigError, match=r"row id 'clip1': its audio_path .*clip0\.pth would be overwritten by <pth_dir>/clip0\.pth"):
        plan_rows(settings)
    assert extract.main(["--config", "extract_t2a.yaml", *args]) == 2
    assert (ds["data"] / "clip0.pth").read_bytes() == before
    assert not never_build
    # The input CSV itself named like a planned <id>.pth is refused too.
    (tmp_path / "pth").mkdir()
    csv_as_pth = ds["csv"].rename(tmp_path / "pth" / "clip0.pth")
    args = overrides(tmp_path, {**ds, "csv": csv_as_pth}, "t2a", f"output.pth_dir={tmp_path / 'pth'}")
    with pytest.raises(ConfigError, match=r"input CSV .* would be overwritten by <pth_dir>/clip0\.pth"):
        plan_rows(ExtractSettings.from_config(load_config("extract_t2a.yaml", args, validate=False)))


# ------------------------------------------------- re-runs notice edited captions / videos
def test_rerun_reencodes_rows_whose_caption_or_video_changed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ds = write_dataset(tmp_path, videos=True, n=3)
    built: list[FakeEncoders] = []
    monkeypatch.setattr(extract, "build_encoders", lambda *a, need_video, **k: built.append(FakeEncoders(need_video)) or built[-1])
    cfg = config(tmp_path, ds, "vt2a", "extraction.batch_size=4")
    first = extract.run_extraction(cfg)
    assert (first.done, first.skipped) == (3, 0)
    pth = tmp_path / "out" / "pth"

    # Edit clip0's caption, give the empty-caption row clip1 a caption; clip2 is untouched.
    rows = [list(r) for r in ds["rows"]]
    rows[0][3], rows[1][3] = "a cat meows", "wind"
    write_csv(ds["csv"], ["id", "audio_path", "video_path", "caption"], rows)
    mtime2 = (pth / "clip2.pth").stat().st_mtime_ns
    second = extract.run_extraction(cfg)
    assert (second.done, second.skipped, second.failed) == (2, 1, 1)
    assert built[-1].text_batches == [["a cat meows", "wind"]]
    for sample_id, caption in (("clip0", "a cat meows"), ("clip1", "wind")):
        text = torch.load(pth / f"{sample_id}.pth", weights_only=True)["text_features"]
        torch.testing.assert_close(text, torch.full((77, 1024), float(len(caption))))
    assert (pth / "clip2.pth").stat().st_mtime_ns == mtime2
    assert read_out_csv(second.csv_path)["text_exist"].tolist() == ["1", "1", "1"]
    assert "[REDO] clip0: made from another caption" in (pth / "extract_vt2a_rank0.log").read_text()

    # Replacing clip2's video (new content, new size/mtime) redoes only clip2.
    ramp_video(ds["data"] / "v2.mp4", base=200)
    third = extract.run_extraction(cfg)
    assert (third.done, third.skipped) == (1, 2)
    clip = torch.load(pth / "clip2.pth", weights_only=True)["clip_features"]
    assert clip[0, 0] > 0.75  # grey level ~200/255, not the old ~100/255

    # A file without a fingerprint (a reference cache) is still accepted as complete.
    feats = torch.load(pth / "clip0.pth", weights_only=True)
    del feats[SOURCE_KEY]
    torch.save(feats, pth / "clip0.pth")
    fourth = extract.run_extraction(cfg)
    assert (fourth.done, fourth.skipped) == (0, 3)


class _NotAllowed:  # a pickled custom class: weights-only loading refuses it
    pass


def test_bad_pth_reason_is_one_short_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ds = write_dataset(tmp_path, videos=False, n=1)
    settings = ExtractSettings.from_config(config(tmp_path, ds, "t2a"))
    path = tmp_path / "x.pth"
    torch.save({"text_features": torch.zeros(77, 1024), "obj": _NotAllowed()}, path)
    with pytest.raises(pickle.UnpicklingError) as raw:  # what PyTorch says: several paragraphs of advice
        torch.load(path, weights_only=True)
    assert "weights_only" in str(raw.value) and "\n" in str(raw.value)
    reason = feature_file_problem(path, expected_feature_shapes(settings), "f")
    assert reason == (
        "unreadable feature file (UnpicklingError: holds objects a weights-only load refuses: "
        "Unsupported global: GLOBAL tests.test_extract._NotAllowed was not an allowed global by default)"
    )
    path.write_bytes(b"not a zip")
    reason = feature_file_problem(path, expected_feature_shapes(settings), "f")
    assert reason is not None and reason.startswith("unreadable feature file (") and "\n" not in reason
    assert len(reason) < 260
    # the row's log line carries the same short reason
    pth = tmp_path / "out" / "pth"
    pth.mkdir(parents=True)
    torch.save({"text_features": torch.zeros(77, 1024), "obj": _NotAllowed()}, pth / "clip0.pth")
    monkeypatch.setattr(extract, "build_encoders", lambda *a, **k: FakeEncoders(need_video=False))
    assert extract.run_extraction(config(tmp_path, ds, "t2a")).done == 1
    log = (pth / "extract_t2a_rank0.log").read_text()
    redo = [line for line in log.splitlines() if "[REDO] clip0" in line]
    assert len(redo) == 1 and redo[0].endswith("was not an allowed global by default)")
    assert "Re-running" not in log and "weights_only" not in log


def test_training_dataset_reads_fingerprinted_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The extra str key is ignored by the trainer's loader (the contract's three tensors are read)."""
    from wavflow.train.dataset import FeatureShapes, TrainRow, load_features
    from wavflow.train.feature_checks import find_feature_problems

    ds = write_dataset(tmp_path, videos=False, n=2)
    monkeypatch.setattr(extract, "build_encoders", lambda *a, **k: FakeEncoders(need_video=False))
    result = extract.run_extraction(config(tmp_path, ds, "t2a"))
    df = read_out_csv(result.csv_path)
    shapes = FeatureShapes(clip=(16, 1024), sync=(40, 768), text=(77, 1024))
    rows = [TrainRow(r.id, Path(r.audio_path), Path(r.features_path), False, r.text_exist == "1", 0, i)
            for i, r in enumerate(df.itertuples())]
    assert SOURCE_KEY in torch.load(rows[0].features_path, weights_only=True)
    assert find_feature_problems(rows, shapes, show_progress=False) == {}
    feats = load_features(rows[0], shapes)
    assert set(feats) == {"clip_features", "sync_features", "text_features"}
    torch.testing.assert_close(feats["text_features"], torch.full((77, 1024), float(len("a dog barks, twice"))))


def test_output_packed_dir_packs_the_extracted_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """output.packed_dir: the merged CSV's features go into shards, with a CSV the trainer reads."""
    from wavflow.features.packed import KEY_COLUMN
    from wavflow.train.dataset import FeatureShapes, TrainRow, load_features
    from wavflow.train.feature_checks import find_feature_problems

    ds = write_dataset(tmp_path, videos=False, n=3)
    monkeypatch.setattr(extract, "build_encoders", lambda *a, **k: FakeEncoders(need_video=False))
    packed_dir = tmp_path / "packed"
    result = extract.run_extraction(config(tmp_path, ds, "t2a", f"output.packed_dir={packed_dir}",
                                           "output.shard_rows=2"))
    summary = json.loads(result.summary_path.read_text())
    assert summary["packed_csv"] == str(packed_dir / "train.csv")
    per_row, packed = read_out_csv(result.csv_path), read_out_csv(packed_dir / "train.csv")
    assert packed["id"].tolist() == per_row["id"].tolist() == packed[KEY_COLUMN].tolist()
    assert sorted(p.name for p in packed_dir.glob("*.safetensors")) == ["train_00000.safetensors", "train_00001.safetensors"]
    assert (packed_dir / "empty_string.pt").is_file() and (packed_dir / "feature_stats.pt").is_file()
    shapes = FeatureShapes(clip=(16, 1024), sync=(40, 768), text=(77, 1024))

    def rows(df: Any) -> list[TrainRow]:
        return [TrainRow(r.id, Path(r.audio_path), Path(r.features_path), False, r.text_exist == "1", 0, i,
                         getattr(r, KEY_COLUMN, "")) for i, r in enumerate(df.itertuples())]

    assert find_feature_problems(rows(packed), shapes, show_progress=False) == {}
    # a packed_dir whose packed CSV would replace the merged CSV is refused before any work
    with pytest.raises(ConfigError, match="output.packed_dir=.* would put the packed CSV over output.csv_path"):
        ExtractSettings.from_config(config(tmp_path, ds, "t2a", f"output.packed_dir={tmp_path / 'out'}"))
    with pytest.raises(ConfigError, match="output.shard_rows"):
        ExtractSettings.from_config(config(tmp_path, ds, "t2a", f"output.packed_dir={packed_dir}", "output.shard_rows=0"))
    for a, b in zip(rows(per_row), rows(packed)):
        assert b.packed and not a.packed
        torch.testing.assert_close(load_features(a, shapes), load_features(b, shapes), rtol=0, atol=0)
