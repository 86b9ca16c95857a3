"""The built-in demo data set: determinism, coverage, CSV schemas, and audio/video alignment."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import av
import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from wavflow.demo.make_dataset import DatasetInfo, load_dataset_info, main, make_dataset, mp4_bytes
from wavflow.demo.sound_events import (
    BACKGROUND_RGB,
    CLASS_BY_NAME,
    CLASS_NAMES,
    EVENT_CLASSES,
    Look,
    ShapePlacement,
    blank_frame,
    class_looks,
    draw_event,
)
from wavflow.errors import ConfigError, ManifestError

N, SEED, DUR, SR, FPS, SIZE = 12, 3, 2.0, 16000, 25, 96


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_ds")
    return make_dataset(root, N, SEED, duration=DUR, sample_rate=SR, fps=FPS, size=SIZE,
                        progress=False)


def _all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_files_and_other_seed_differs(dataset, tmp_path):
    again = make_dataset(tmp_path / "again", N, SEED, duration=DUR, progress=False)
    first, second = _all_files(dataset.root), _all_files(again.root)
    assert sorted(first) == sorted(second)
    assert len([k for k in first if k.endswith(".wav")]) == N
    for name in first:
        if name.endswith(".mp4"):  # the frames, not x264's bytes (see test_videos_are_lossless)
            assert np.array_equal(_decode_rgb(dataset.root / name), _decode_rgb(again.root / name)), name
        else:  # wavs, CSVs and events.json: byte for byte
            assert first[name] == second[name], f"{name} differs between two runs with the same seed"

    other = make_dataset(tmp_path / "other", N, SEED + 1, duration=DUR, progress=False)
    other_files = _all_files(other.root)
    assert other_files["events.json"] != first["events.json"]
    assert sum(other_files[k] != first[k] for k in first if k.endswith(".wav")) == N


def test_classes_modes_and_splits_cover_everything(dataset):
    assert {c.label for c in dataset.clips} == set(CLASS_NAMES)
    assert {c.label for c in dataset.split("train")} == set(CLASS_NAMES)
    for split in ("train", "holdout"):
        assert {c.mode for c in dataset.split(split)} == {"VT2A", "T2A", "V2A"}, split
    assert len(dataset.split("holdout")) >= 3
    assert [c.id for c in dataset.clips] == [f"clip_{i:05d}" for i in range(N)]
    for clip in dataset.clips:
        assert 1 <= len(clip.onsets) <= 3
        assert clip.onset_frames == [round(t * FPS) for t in clip.onsets]
        assert all(abs(t * FPS - round(t * FPS)) < 1e-9 for t in clip.onsets), "onsets off the frame grid"
        ends = [o + d for o, d in zip(clip.onset_frames, clip.duration_frames)]
        assert ends[-1] <= DUR * FPS
        gaps = [b - a for a, b in zip(ends[:-1], clip.onset_frames[1:])]
        assert all(g >= 4 for g in gaps), f"{clip.id}: events closer than the minimum gap {gaps}"


def test_csv_schemas_and_relative_paths(dataset):
    root = dataset.root
    vt2a = pd.read_csv(root / "train_vt2a.csv", keep_default_na=False)
    t2a = pd.read_csv(root / "train_t2a.csv", keep_default_na=False)
    infer = pd.read_csv(root / "holdout_infer.csv", keep_default_na=False)
    ref = pd.read_csv(root / "holdout_reference.csv", keep_default_na=False)
    assert list(vt2a.columns) == ["id", "audio_path", "video_path", "caption", "label", "onsets"]
    assert list(t2a.columns) == ["id", "audio_path", "caption", "label", "onsets"]
    assert list(infer.columns) == ["id", "video_path", "caption", "video_exist", "text_exist"]
    assert {"id", "audio_path", "video_path", "caption", "mode", "label", "onsets"} <= set(ref.columns)

    clips = dataset.by_id()
    train_ids = {c.id for c in dataset.split("train")}
    assert set(vt2a.id) | set(t2a.id) == train_ids and not set(vt2a.id) & set(t2a.id)
    assert set(infer.id) == set(ref.id) == {c.id for c in dataset.split("holdout")}
    for row in vt2a.itertuples():
        assert clips[row.id].mode in ("VT2A", "V2A")
        assert (row.caption == "") == (clips[row.id].mode == "V2A")
        assert not Path(row.audio_path).is_absolute() and (root / row.audio_path).is_file()
        assert (root / row.video_path).is_file()
    assert all(clips[i].mode == "T2A" for i in t2a.id)
    assert all(c != "" for c in t2a.caption)
    for row in infer.itertuples():
        mode = clips[row.id].mode
        assert (row.video_exist, row.text_exist) == {"VT2A": (1, 1), "T2A": (0, 1), "V2A": (1, 0)}[mode]
        assert (row.video_path != "") == bool(row.video_exist)
        assert (row.caption != "") == bool(row.text_exist)
    for row in ref.itertuples():
        assert [float(t) for t in row.onsets.split()] == pytest.approx(clips[row.id].onsets)

    events = json.loads((root / "events.json").read_text())
    assert events["sample_rate"] == SR and events["fps"] == FPS and events["classes"] == list(CLASS_NAMES)
    meta = pd.read_csv(root / "metadata.csv", keep_default_na=False)
    assert list(meta.id) == [c["id"] for c in events["clips"]]
    loaded = load_dataset_info(root)
    assert loaded.clips == dataset.clips


_KEYWORDS = {
    "low_tone": ("low", "deep"), "high_tone": ("high", "shrill"), "chirp": ("chirp", "sweep", "glid"),
    "noise_burst": ("static", "hiss", "noise"), "clicks": ("click",), "two_tone": ("two-tone", "two-note", "ding-dong"),
}
_COUNT = {1: "a single", 2: "two", 3: "three"}


def test_captions_name_the_class_and_count_clicks(dataset):
    for clip in dataset.clips:
        assert any(k in clip.description for k in _KEYWORDS[clip.label]), (clip.label, clip.description)
        if clip.label == "clicks":
            assert _COUNT[len(clip.onsets)] in clip.description
        assert clip.caption == ("" if clip.mode == "V2A" else clip.description)


def test_wavs_have_the_format_level_and_silence_between_events(dataset):
    for clip in dataset.clips:
        wave, sr = sf.read(dataset.root / clip.audio_path, dtype="float64")
        assert sr == SR and wave.ndim == 1 and wave.size == int(DUR * SR)
        assert np.abs(wave).max() <= 0.95 + 1e-4
        lead = wave[: int(clip.onsets[0] * SR)]
        assert lead.size >= int(0.08 * SR)  # at least two frames of lead-in
        assert 0.005 < np.sqrt(np.mean(lead**2)) < 0.02  # the -40 dBFS background


def _decode_rgb(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.average_rate == FPS
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])


@pytest.mark.skipif("libx264" not in av.codecs_available, reason="lossless needs libx264")
def test_videos_are_lossless(tmp_path):
    """Decoded frames are exactly the drawn frames after the yuv420p conversion: this is what lets
    a seed fix them, since the bytes of a lossy x264 encode vary now and then under CPU load."""
    rng = np.random.default_rng(0)
    drawn = rng.integers(0, 256, size=(6, SIZE, SIZE, 3), dtype=np.uint8)  # hard to compress
    path = tmp_path / "clip.mp4"
    path.write_bytes(mp4_bytes(drawn, FPS))
    decoded = _decode_rgb(path)
    for k, rgb in enumerate(drawn):
        expected = (av.VideoFrame.from_ndarray(rgb, format="rgb24")
                    .reformat(format="yuv420p").to_ndarray(format="rgb24"))
        assert np.array_equal(decoded[k], expected), k


def _appearance_runs(frames: np.ndarray) -> tuple[list[int], list[int], list[np.ndarray]]:
    """First frame, length and mean bright colour of each run of frames showing a shape."""
    bright = frames.max(axis=3) > 90
    visible = bright.reshape(len(frames), -1).sum(axis=1) > 20
    starts, lengths, colours = [], [], []
    k = 0
    while k < len(frames):
        if visible[k]:
            j = k
            while j < len(frames) and visible[j]:
                j += 1
            starts.append(k)
            lengths.append(j - k)
            colours.append(frames[k][bright[k]].mean(axis=0))
            k = j
        else:
            k += 1
    return starts, lengths, colours


def _audio_onsets(wave: np.ndarray, sr: int) -> list[float]:
    """Starts of loud stretches: 5 ms frames above -25 dBFS RMS after >= 60 ms below."""
    hop = sr // 200
    frames = wave[: wave.size // hop * hop].reshape(-1, hop)
    loud = np.sqrt((frames**2).mean(axis=1)) > 10 ** (-25 / 20)
    onsets, quiet_run = [], 12
    for k, is_loud in enumerate(loud):
        if is_loud and quiet_run >= 12:
            onsets.append(k * hop / sr)
        quiet_run = 0 if is_loud else quiet_run + 1
    return onsets


def test_video_shapes_appear_exactly_at_the_audio_onsets(dataset):
    for clip in dataset.clips:
        frames = _decode_rgb(dataset.root / clip.video_path)
        assert frames.shape == (int(DUR * FPS), SIZE, SIZE, 3)
        starts, lengths, colours = _appearance_runs(frames)
        assert starts == clip.onset_frames, clip.id
        assert lengths == clip.duration_frames, clip.id
        expected = np.asarray(CLASS_BY_NAME[clip.label].colour, dtype=np.float64)
        for colour in colours:
            if clip.label == "noise_burst":  # grey static: bright and colourless
                assert colour.min() > 150 and colour.max() - colour.min() < 20
            else:
                assert np.abs(colour - expected).max() < 45, (clip.id, colour, expected)

        wave, sr = sf.read(dataset.root / clip.audio_path, dtype="float64")
        audio = _audio_onsets(wave, sr)
        video = [k / FPS for k in starts]
        assert len(audio) == len(video) == len(clip.onsets), (clip.id, audio, clip.onsets)
        assert np.abs(np.asarray(audio) - np.asarray(clip.onsets)).max() <= 1 / FPS
        assert np.abs(np.asarray(video) - np.asarray(clip.onsets)).max() <= 1 / FPS


def test_cli_and_argument_errors(tmp_path, capsys):
    main(["--out", str(tmp_path / "cli"), "--n", "3", "--seed", "0", "--duration", "1.2",
          "--sample-rate", "8000", "--size", "64"])
    assert "data.data_root=" in capsys.readouterr().out
    info = load_dataset_info(tmp_path / "cli" / "events.json")
    assert len(info.clips) == 3 and info.sample_rate == 8000
    wave, sr = sf.read(tmp_path / "cli" / info.clips[0].audio_path)
    assert sr == 8000 and wave.size == int(1.2 * 8000)
    with pytest.raises(ConfigError, match="--duration"):
        make_dataset(tmp_path / "bad", 2, 0, duration=0.5)
    with pytest.raises(ConfigError, match="--holdout-frac"):
        make_dataset(tmp_path / "bad", 2, 0, holdout_frac=1.5)
    with pytest.raises(ManifestError, match="events.json"):
        load_dataset_info(tmp_path / "nowhere")
    (tmp_path / "broken.json").write_text("{}")
    with pytest.raises(ManifestError, match="broken.json"):
        load_dataset_info(tmp_path / "broken.json")


# ----------------------------------------------------------------------------------------------
# Variations: class subsets, held-out caption wordings, another palette


def _renderings(templates: tuple[str, ...]) -> set[str]:
    """Every caption the templates give for 1-3 events (as make_caption words them)."""
    return {t.format(count=w, s="" if k == 1 else "s")
            for t in templates for k, w in ((1, "a single"), (2, "two"), (3, "three"))}


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def test_heldout_wordings_are_new_and_keep_a_class_unique_clip_token():
    """A bag-of-words text encoder over CLIP BPE tokens recognises an unseen wording only through
    tokens it shares with the class's training captions and with no other class's captions."""
    from open_clip.tokenizer import SimpleTokenizer  # the BPE of the CLIP text tower

    bpe = SimpleTokenizer()
    train = {c.name: _renderings(c.templates) for c in EVENT_CLASSES}
    heldout = {c.name: _renderings(c.heldout_templates) for c in EVENT_CLASSES}
    all_train = set().union(*train.values())
    for cls in EVENT_CLASSES:
        assert len(cls.heldout_templates) >= 2 and cls.key_words, cls.name
        assert not set(cls.heldout_templates) & set(cls.templates), cls.name
        assert not heldout[cls.name] & all_train, f"{cls.name}: a held-out wording is a training one"
        others = set().union(*(train[o] | heldout[o] for o in train if o != cls.name))
        other_tokens = set().union(*(bpe.encode(text) for text in others))
        train_words = set().union(*(_words(text) for text in train[cls.name]))
        for word in cls.key_words:
            assert word in train_words, (cls.name, word)
            assert not set(bpe.encode(word)) & other_tokens, f"{cls.name}: key word {word!r} not unique"
        for text in heldout[cls.name]:
            assert _words(text) & set(cls.key_words), f"{cls.name}: {text!r} keeps no key word"
    # the old check: "tone" names three classes, so it must be no class's key word
    assert not any("tone" in c.key_words for c in EVENT_CLASSES)


def test_palettes_are_bright_distinct_deterministic_and_permute_shapes():
    builtin = class_looks(None)
    assert {n: (lk.colour, lk.shape) for n, lk in builtin.items()} == {
        c.name: (c.colour, c.shape) for c in EVENT_CLASSES}
    background = np.asarray(BACKGROUND_RGB, dtype=np.float64)
    shape_orders = set()
    for seed in range(200):
        looks = class_looks(seed)
        assert looks == class_looks(seed) and list(looks) == list(CLASS_NAMES)
        colours = np.asarray([lk.colour for lk in looks.values()], dtype=np.float64)
        assert colours.min() >= 0 and colours.max() <= 255
        assert colours.sum(axis=1).min() >= 240, seed  # far above the gate of the tiny CLIP
        assert (np.linalg.norm(colours / 255, axis=1) >= 0.6).all(), seed
        assert np.linalg.norm(colours - background, axis=1).min() >= 200, seed
        pair_gap = min(np.linalg.norm(a - b) for a, b in itertools.combinations(colours, 2))
        assert pair_gap >= 100, (seed, pair_gap)
        shapes = [lk.shape for lk in looks.values()]
        assert sorted(shapes) == sorted(c.shape for c in EVENT_CLASSES)
        shape_orders.add(tuple(shapes))
    assert len(shape_orders) > 50  # the shapes really move between classes
    assert class_looks(1) != class_looks(2)


def test_draw_event_uses_the_look():
    placement = ShapePlacement(cx=48.0, cy=48.0, radius=18.0, texture_seed=5)
    bg = np.asarray(BACKGROUND_RGB, dtype=np.uint8)
    plain, looked = blank_frame(96), blank_frame(96)
    draw_event(plain, "two_tone", placement)  # built-in: a magenta bar
    draw_event(looked, "clicks", placement, Look((10, 200, 240), "bar"))
    assert np.array_equal((plain != bg).any(axis=2), (looked != bg).any(axis=2))  # same mask
    assert {tuple(p) for p in looked[(looked != bg).any(axis=2)]} == {(10, 200, 240)}
    # a tinted noisy blob: static in the look's colour; the built-in one stays grey
    grey, tinted = blank_frame(96), blank_frame(96)
    draw_event(grey, "noise_burst", placement)
    draw_event(tinted, "chirp", placement, Look((40, 230, 90), "noisy_blob", tinted=True))
    mask = (grey != bg).any(axis=2)
    assert np.array_equal(mask, (tinted != bg).any(axis=2))
    assert (grey[mask].max(axis=1) == grey[mask].min(axis=1)).all()
    ratio = tinted[mask].astype(np.float64) / np.asarray([40, 230, 90])
    assert np.allclose(ratio, grey[mask][:, :1] / 255.0, atol=0.02)


SUBSET = ["high_tone", "noise_burst", "clicks", "two_tone"]
VAR_N, VAR_SEED, VAR_PALETTE = 16, 11, 4


def _make_variation(root: Path, **overrides) -> DatasetInfo:
    kwargs = dict(duration=2.0, holdout_frac=0.25, progress=False, classes=SUBSET,
                  caption_split="heldout", palette_seed=VAR_PALETTE)
    kwargs.update(overrides)
    return make_dataset(root, VAR_N, VAR_SEED, **kwargs)


@pytest.fixture(scope="module")
def variation(tmp_path_factory):
    return _make_variation(tmp_path_factory.mktemp("demo_var"))


def test_variation_is_deterministic_and_keeps_to_the_class_subset(variation, tmp_path):
    root = variation.root
    again = _make_variation(tmp_path / "again")
    first, second = _all_files(root), _all_files(again.root)
    assert sorted(first) == sorted(second)
    for name in first:
        if name.endswith((".wav", ".csv", ".json")):
            assert first[name] == second[name], f"{name} differs between two runs with the same args"
    assert len([k for k in first if k.endswith(".wav")]) == VAR_N

    for csv in ("train_vt2a.csv", "train_t2a.csv", "holdout_reference.csv", "metadata.csv"):
        labels = set(pd.read_csv(root / csv, keep_default_na=False).label)
        assert labels and labels <= set(SUBSET), (csv, labels)
    train = pd.concat([pd.read_csv(root / f, keep_default_na=False)
                       for f in ("train_vt2a.csv", "train_t2a.csv")])
    assert set(train.label) == set(SUBSET)  # every class is trained on
    for split in ("train", "holdout"):
        assert {c.mode for c in variation.split(split)} == {"VT2A", "T2A", "V2A"}, split

    events = json.loads((root / "events.json").read_text())
    assert events["classes"] == SUBSET and events["caption_split"] == "heldout"
    assert events["palette_seed"] == VAR_PALETTE
    loaded = load_dataset_info(root)
    assert loaded.classes == SUBSET and loaded.caption_split == "heldout"
    assert loaded.palette_seed == VAR_PALETTE and loaded.clips == variation.clips


def test_heldout_captions_use_only_unseen_wordings(variation):
    root = variation.root
    train_sets = {n: _renderings(CLASS_BY_NAME[n].templates) for n in SUBSET}
    heldout_sets = {n: _renderings(CLASS_BY_NAME[n].heldout_templates) for n in SUBSET}
    train = pd.concat([pd.read_csv(root / f, keep_default_na=False)
                       for f in ("train_vt2a.csv", "train_t2a.csv")])
    for row in train.itertuples():
        assert row.caption == "" or row.caption in train_sets[row.label], (row.id, row.caption)
    ref = pd.read_csv(root / "holdout_reference.csv", keep_default_na=False)
    infer = pd.read_csv(root / "holdout_infer.csv", keep_default_na=False).set_index("id")
    assert (ref.caption != "").sum() >= 2
    for row in ref.itertuples():
        assert infer.loc[row.id, "caption"] == row.caption
        assert row.caption == "" or row.caption in heldout_sets[row.label], (row.id, row.caption)
    for clip in variation.clips:  # V2A clips keep their description in events.json
        wordings = heldout_sets if clip.split == "holdout" else train_sets
        assert clip.description in wordings[clip.label], (clip.id, clip.description)
        assert clip.caption in ("", clip.description)


def test_heldout_captions_and_palette_leave_the_sound_unchanged(variation, tmp_path):
    shared = _make_variation(tmp_path / "shared", caption_split="shared", palette_seed=None)
    assert shared.caption_split == "shared"
    for a, b in zip(variation.clips, shared.clips):
        assert (a.id, a.split, a.mode, a.label, a.onsets) == (b.id, b.split, b.mode, b.label, b.onsets)
        assert (variation.root / a.audio_path).read_bytes() == (shared.root / b.audio_path).read_bytes()
        if a.split == "train":
            assert a.caption == b.caption
        else:
            assert a.description != b.description
            assert b.description in _renderings(CLASS_BY_NAME[b.label].templates)


def test_palette_video_shows_the_new_colours_at_the_onsets(variation):
    looks = class_looks(VAR_PALETTE)
    seen = set()
    for clip in variation.clips:
        frames = _decode_rgb(variation.root / clip.video_path)
        starts, lengths, colours = _appearance_runs(frames)
        assert starts == clip.onset_frames and lengths == clip.duration_frames, clip.id
        look = looks[clip.label]
        expected = np.asarray(look.colour, dtype=np.float64)
        for colour in colours:
            if look.shape == "noisy_blob":  # static: the colour's direction, 60-100 % as bright
                cosine = colour @ expected / np.linalg.norm(colour) / np.linalg.norm(expected)
                assert cosine > 0.98 and 0.6 < np.linalg.norm(colour) / np.linalg.norm(expected) < 1.0
            else:
                assert np.abs(colour - expected).max() < 45, (clip.id, colour, expected)
        seen.add(clip.label)
    assert seen == set(SUBSET)


def test_variation_cli_and_errors(tmp_path, capsys):
    main(["--out", str(tmp_path / "cli"), "--n", "4", "--seed", "0", "--duration", "1.0",
          "--sample-rate", "8000", "--size", "64", "--classes", "chirp, low_tone",
          "--caption-split", "heldout", "--palette-seed", "9"])
    assert "data.data_root=" in capsys.readouterr().out
    info = load_dataset_info(tmp_path / "cli")
    assert info.classes == ["chirp", "low_tone"] and info.caption_split == "heldout"
    assert info.palette_seed == 9 and {c.label for c in info.clips} <= {"chirp", "low_tone"}
    with pytest.raises(ConfigError, match=r"unknown class 'hum'.*low_tone, high_tone"):
        make_dataset(tmp_path / "bad", 4, 0, classes=["low_tone", "hum"])
    with pytest.raises(ConfigError, match="at least 2"):
        make_dataset(tmp_path / "bad", 4, 0, classes=["chirp"])
    with pytest.raises(ConfigError, match="twice"):
        make_dataset(tmp_path / "bad", 4, 0, classes=["chirp", "chirp"])
    with pytest.raises(ConfigError, match="--caption-split"):
        make_dataset(tmp_path / "bad", 4, 0, caption_split="unseen")
    assert main(["--out", str(tmp_path / "bad"), "--caption-split", "unseen"]) == 2  # argparse choices: usage error
    assert not (tmp_path / "bad").exists()


def test_older_events_json_reads_as_the_default_variation(dataset, tmp_path):
    payload = json.loads((dataset.root / "events.json").read_text())
    assert payload.pop("caption_split") == "shared" and payload.pop("palette_seed") is None
    (tmp_path / "events.json").write_text(json.dumps(payload))
    old = load_dataset_info(tmp_path / "events.json")
    assert old.caption_split == "shared" and old.palette_seed is None
    assert old.clips == dataset.clips and old.classes == list(CLASS_NAMES)
