"""The `instruments` demo data set: SoundFont notes, lit pictures and instrument captions.

Determinism, class separability of the rendered audio (and the demo scorer on it), note-on
alignment of the audio and the video, caption wordings, clear errors when the SoundFont or the
synthesiser is missing, and the variations (class subset, CLI, held-out wordings)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import re
import sys
from pathlib import Path

import av
import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from wavflow.demo import soundfont
from wavflow.demo.instruments import (
    IDLE_BRIGHTNESS,
    INSTRUMENT_BY_NAME,
    INSTRUMENT_NAMES,
    INSTRUMENTS,
    LONG_SEC,
    LOUD_VELOCITY,
    SHORT_SEC,
    SOFT_VELOCITY,
)
from wavflow.demo.make_dataset import DatasetInfo, load_dataset_info, main, make_dataset
from wavflow.demo.metrics import (
    LinearDiscriminantClassifier,
    clip_embedding,
    detect_onsets,
    evaluate_waves,
    fit_reference,
    log_mel,
)
from wavflow.errors import ConfigError

N, SEED, DUR, SR, FPS, SIZE = 96, 4, 1.0, 16000, 25, 96
SMALL_N = 8
_COUNT = {1: "a single", 2: "two", 3: "three"}
_ADJECTIVES = ("", "soft ", "loud ", "short ", "long ")


def _make(root: Path, n: int = N, seed: int = SEED, **overrides) -> DatasetInfo:
    kwargs = dict(duration=DUR, sample_rate=SR, fps=FPS, size=SIZE, holdout_frac=0.25,
                  progress=False, dataset="instruments")
    kwargs.update(overrides)
    return make_dataset(root, n, seed, **kwargs)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> DatasetInfo:
    return _make(tmp_path_factory.mktemp("instruments_ds"))


@pytest.fixture(scope="module")
def reference(dataset):
    return fit_reference(dataset)


def _all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _decode_rgb(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.average_rate == FPS
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])


def _read(info: DatasetInfo, clip) -> np.ndarray:
    wave, sr = sf.read(info.root / clip.audio_path, dtype="float64")
    assert sr == info.sample_rate
    return wave


# ------------------------------------------------------------------------------ determinism


def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path):
    first_info = _make(tmp_path / "a", SMALL_N, 21)
    second_info = _make(tmp_path / "b", SMALL_N, 21)
    first, second = _all_files(first_info.root), _all_files(second_info.root)
    assert sorted(first) == sorted(second)
    assert len([k for k in first if k.endswith(".wav")]) == SMALL_N
    assert len([k for k in first if k.endswith(".mp4")]) == SMALL_N
    for name in first:
        if name.endswith(".mp4"):  # the frames, not x264's bytes (as tests/test_demo_dataset.py)
            assert np.array_equal(_decode_rgb(first_info.root / name),
                                  _decode_rgb(second_info.root / name)), name
        else:  # wavs, CSVs and events.json: byte for byte
            assert first[name] == second[name], f"{name} differs between two runs with the same seed"
    assert first_info.clips == second_info.clips

    other = _all_files(_make(tmp_path / "c", SMALL_N, 22).root)
    assert other["events.json"] != first["events.json"]
    assert sum(other[k] != first[k] for k in first if k.endswith(".wav")) == SMALL_N


def test_classes_modes_notes_and_details(dataset):
    assert dataset.dataset == "instruments" and dataset.classes == list(INSTRUMENT_NAMES)
    for split in ("train", "holdout"):
        clips = dataset.split(split)
        assert {c.label for c in clips} == set(INSTRUMENT_NAMES), split
        assert {c.mode for c in clips} == {"VT2A", "T2A", "V2A"}, split
    counts = {len(c.onsets) for c in dataset.clips}
    assert counts == {1, 2, 3}
    for clip in dataset.clips:
        inst = INSTRUMENT_BY_NAME[clip.label]
        assert clip.onset_frames == [round(t * FPS) for t in clip.onsets]
        assert clip.onset_frames[0] >= 2  # lead-in before the first note
        ends = [o + d for o, d in zip(clip.onset_frames, clip.duration_frames)]
        assert ends[-1] <= DUR * FPS - 1
        assert all(b - a >= 4 for a, b in zip(ends[:-1], clip.onset_frames[1:])), clip.id
        lo, hi = inst.note_sec
        assert len(set(clip.duration_frames)) == 1
        assert round(lo * FPS) <= clip.duration_frames[0] <= round(hi * FPS), clip.id
        pitches, velocity = clip.details["pitches"], clip.details["velocity"]
        assert 50 <= velocity <= 127 and len(pitches) == len(clip.onsets)
        for chord in pitches:
            assert chord[0] in inst.pitches
            if inst.chord:  # a major or minor triad on the root
                assert chord[1] - chord[0] in (3, 4) and chord[2] - chord[0] == 7
            else:
                assert len(chord) == 1


# ------------------------------------------------------------------------------ audio classes


def test_instruments_are_separable_and_the_scorer_works_on_real_audio(dataset, reference):
    embed = {c.id: clip_embedding(log_mel(_read(dataset, c), SR)) for c in dataset.clips}
    train, holdout = dataset.split("train"), dataset.split("holdout")
    clf = LinearDiscriminantClassifier().fit(np.stack([embed[c.id] for c in train]),
                                             [c.label for c in train])
    predicted = clf.predict(np.stack([embed[c.id] for c in holdout]))
    accuracy = np.mean([p == c.label for p, c in zip(predicted, holdout)])
    assert accuracy >= 0.95, list(zip(predicted, [c.label for c in holdout]))

    assert isinstance(reference.classifier, LinearDiscriminantClassifier)
    waves = {c.id: sf.read(dataset.root / c.audio_path, dtype="float32")[0] for c in holdout}
    metrics = evaluate_waves(waves, reference)
    for mode in ("VT2A", "T2A", "V2A"):
        g = metrics["groups"][mode]
        assert g["n"] >= 1, mode
        assert g["class_accuracy"] >= 0.95, (mode, g)
        assert g["onset_median_ms"] <= 10.0, (mode, g)
        noise = metrics["baselines"]["white_noise"][mode]  # the scale: noise has no onsets
        assert noise["onset_median_ms"] >= 500.0, (mode, noise)


def test_onset_lags_are_measured_per_class(reference):
    lags = reference.onset_lags
    assert set(lags) == set(INSTRUMENT_NAMES)
    assert all(-0.005 <= lag <= 0.08 for lag in lags.values()), lags
    # slow attacks (bowed violin, flute) reach half power later than struck or plucked notes
    fast = max(lags[n] for n in ("drums", "marimba", "organ", "guitar"))
    assert min(lags["violin"], lags["flute"]) > fast + 0.01, lags


def test_audio_is_quiet_before_the_first_note_and_peaks_with_velocity(dataset):
    for clip in dataset.clips:
        wave = _read(dataset, clip)
        assert wave.ndim == 1 and wave.size == int(DUR * SR)
        lead = wave[: int(clip.onsets[0] * SR)]
        assert np.sqrt(np.mean(lead**2)) < 0.012, clip.id  # the -45 dBFS room tone
        assert np.abs(wave).max() <= 0.8 * clip.details["velocity"] / 127 + 0.03, clip.id


# ------------------------------------------------------------------------------ audio / video


def _lit_frames(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame mean brightness and which frames are lit (above the middle of its range)."""
    brightness = frames.astype(np.float64).mean(axis=(1, 2, 3))
    return brightness, brightness > 0.5 * (brightness.min() + brightness.max())


def test_picture_is_lit_exactly_on_the_note_frames(dataset):
    total = int(DUR * FPS)
    for clip in dataset.clips:
        frames = _decode_rgb(dataset.root / clip.video_path)
        assert frames.shape == (total, SIZE, SIZE, 3), clip.id
        expected = np.zeros(total, dtype=bool)
        for onset, dur in zip(clip.onset_frames, clip.duration_frames):
            expected[onset:onset + dur] = True
        brightness, lit = _lit_frames(frames)
        assert brightness[expected].min() - brightness[~expected].max() > 1.0, (clip.id, brightness)
        assert np.array_equal(lit, expected), (clip.id, np.nonzero(lit)[0], clip.onset_frames)
        rises = [k for k in range(1, total) if lit[k] and not lit[k - 1]]
        assert rises == clip.onset_frames, clip.id
        # two pictures only: every lit frame equals the first lit one, every dim frame frame 0
        first_lit = frames[clip.onset_frames[0]]
        assert all(np.array_equal(frames[k], first_lit) for k in np.nonzero(expected)[0]), clip.id
        assert all(np.array_equal(frames[k], frames[0]) for k in np.nonzero(~expected)[0]), clip.id

        # the picture sits at its instrument's place and is dim, not absent, while silent
        idle, on = frames[0].astype(np.float64), first_lit.astype(np.float64)
        mask = np.abs(on - idle).max(axis=2) > 20
        ys, xs = np.nonzero(mask)
        place = INSTRUMENT_BY_NAME[clip.label].place
        assert abs(xs.mean() / SIZE - place[0]) < 0.08 and abs(ys.mean() / SIZE - place[1]) < 0.08, \
            (clip.id, xs.mean() / SIZE, ys.mean() / SIZE, place)
        background = on[~mask].mean(axis=0)
        lift = (idle[mask].sum(axis=1) - background.sum()).mean() / \
            (on[mask].sum(axis=1) - background.sum()).mean()
        assert abs(lift - IDLE_BRIGHTNESS) < 0.1, (clip.id, lift)


FAST_ATTACKS = ("drums", "marimba", "organ")  # reach half power within a few ms of note-on


def test_audio_note_ons_match_the_reference_less_the_class_lag(dataset, reference):
    errors, worst, raw_fast = [], [], []
    for clip in dataset.clips:
        lag = reference.onset_lags[clip.label]
        raw = detect_onsets(_read(dataset, clip), SR)
        detected = raw - lag
        if clip.label in FAST_ATTACKS and raw.size:  # no fitted lag: the audio itself is on time
            raw_fast.extend(np.abs(np.asarray(clip.onsets)[:, None] - raw[None, :]).min(axis=1))
        assert detected.size, clip.id
        err = np.abs(np.asarray(clip.onsets)[:, None] - detected[None, :]).min(axis=1)
        errors.extend(err)
        worst.append((float(err.max()), clip.id, clip.label))
        assert err.max() <= 1.0 / FPS, (clip.id, clip.label, clip.onsets, detected)  # every note found
    errors = np.asarray(errors)
    assert errors.size == sum(len(c.onsets) for c in dataset.clips)
    assert np.mean(errors <= 0.010) >= 0.90, (np.mean(errors <= 0.010), sorted(worst)[-5:])
    assert len(raw_fast) >= 20 and np.median(raw_fast) <= 0.005, np.median(raw_fast)


# ------------------------------------------------------------------------------ captions


def _renderings(inst, templates: tuple[str, ...], counts=(1, 2, 3)) -> set[str]:
    """Every caption the templates give for 1-3 notes, with every adjective make_caption uses."""
    return {t.format(count=_COUNT[k], adj=adj, noun=inst.noun, s="" if k == 1 else "s")
            for t in templates for k in counts for adj in _ADJECTIVES}


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def _bpe():
    from open_clip.tokenizer import SimpleTokenizer  # the BPE of the CLIP text tower

    return SimpleTokenizer()


def test_templates_and_key_words_are_unique_to_each_instrument():
    bpe = _bpe()
    train = {i.name: _renderings(i, i.templates) for i in INSTRUMENTS}
    heldout = {i.name: _renderings(i, i.heldout_templates) for i in INSTRUMENTS}
    all_train = set().union(*train.values())
    for inst in INSTRUMENTS:
        assert len(inst.templates) >= 3 and len(inst.heldout_templates) >= 2, inst.name
        assert not set(inst.templates) & set(inst.heldout_templates), inst.name
        assert not heldout[inst.name] & all_train, f"{inst.name}: a held-out wording is a training one"
        assert inst.key_words, inst.name
        others = set().union(*(train[o] | heldout[o] for o in train if o != inst.name))
        other_words = set().union(*(_words(t) for t in others))
        other_tokens = set().union(*(bpe.encode(t) for t in others))
        for word in inst.key_words:
            assert word not in other_words, f"{inst.name}: key word {word!r} in another's captions"
            assert not set(bpe.encode(word)) & other_tokens, \
                f"{inst.name}: a CLIP token of key word {word!r} is in another instrument's captions"
        for text in heldout[inst.name]:
            assert _words(text) & set(inst.key_words), f"{inst.name}: {text!r} keeps no key word"
        train_words = set().union(*(_words(t) for t in train[inst.name]))
        assert train_words & set(inst.key_words), f"{inst.name}: no key word in training captions"


def test_every_heldout_wording_shares_a_class_unique_clip_token_with_training():
    """As for the shapes set (test_demo_dataset): a bag-of-words text encoder over CLIP BPE
    tokens recognises an unseen wording only through tokens it shares with the class's training
    captions and with no other class's captions."""
    bpe = _bpe()
    train = {i.name: _renderings(i, i.templates) for i in INSTRUMENTS}
    heldout = {i.name: _renderings(i, i.heldout_templates) for i in INSTRUMENTS}
    unrecognisable = []
    for inst in INSTRUMENTS:
        others = set().union(*(train[o] | heldout[o] for o in train if o != inst.name))
        other_tokens = set().union(*(bpe.encode(t) for t in others))
        own_tokens = set().union(*(bpe.encode(t) for t in train[inst.name]))
        unrecognisable += [text for text in sorted(heldout[inst.name])
                           if not set(bpe.encode(text)) & own_tokens - other_tokens]
    assert not unrecognisable, unrecognisable


def test_captions_count_the_notes_and_describe_how_they_sound(dataset):
    for clip in dataset.clips:
        inst = INSTRUMENT_BY_NAME[clip.label]
        count = len(clip.onsets)
        text = clip.description
        assert text in _renderings(inst, inst.templates, counts=(count,)), (clip.id, text)
        assert _COUNT[count] in text and not any(
            w in text.split() for k, w in _COUNT.items() if k != count and k != 1), (clip.id, text)
        words = text.split()
        velocity, note_sec = clip.details["velocity"], clip.durations[0]
        assert ("soft" not in words) or velocity < SOFT_VELOCITY, (clip.id, text, velocity)
        assert ("loud" not in words) or velocity > LOUD_VELOCITY, (clip.id, text, velocity)
        assert ("short" not in words) or note_sec < SHORT_SEC, (clip.id, text, note_sec)
        assert ("long" not in words) or note_sec > LONG_SEC, (clip.id, text, note_sec)
        assert clip.caption == ("" if clip.mode == "V2A" else text)
    used = {w for c in dataset.clips for w in c.description.split()}
    assert {"soft", "loud", "short", "long"} <= used  # the adjectives do get drawn


def test_heldout_caption_split_changes_only_the_holdout_wordings(tmp_path):
    shared = _make(tmp_path / "shared", 24, 9)
    held = _make(tmp_path / "held", 24, 9, caption_split="heldout")
    assert held.caption_split == "heldout" and load_dataset_info(held.root).caption_split == "heldout"
    assert len(held.split("holdout")) >= 3
    for a, b in zip(shared.clips, held.clips):
        inst = INSTRUMENT_BY_NAME[a.label]
        assert (a.id, a.split, a.mode, a.label, a.onsets, a.details) == \
            (b.id, b.split, b.mode, b.label, b.onsets, b.details)
        assert (shared.root / a.audio_path).read_bytes() == (held.root / b.audio_path).read_bytes()
        assert np.array_equal(_decode_rgb(shared.root / a.video_path),
                              _decode_rgb(held.root / b.video_path)), a.id
        count = (len(b.onsets),)
        if b.split == "train":
            assert a.description == b.description
        else:
            assert b.description in _renderings(inst, inst.heldout_templates, count), b.description
            assert a.description in _renderings(inst, inst.templates, count), a.description
        assert b.caption in ("", b.description)
    ref = pd.read_csv(held.root / "holdout_reference.csv", keep_default_na=False)
    train = pd.concat([pd.read_csv(held.root / f, keep_default_na=False)
                       for f in ("train_vt2a.csv", "train_t2a.csv")])
    heldout_all = set().union(*(_renderings(i, i.heldout_templates) for i in INSTRUMENTS))
    assert (ref.caption != "").sum() >= 2
    assert all(c == "" or c in heldout_all for c in ref.caption)
    assert not set(train.caption) & heldout_all


# ------------------------------------------------------------------------------ errors


def test_missing_pretty_midi_names_the_install(tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec

    def no_pretty_midi(name, *args, **kwargs):
        return None if name == "pretty_midi" else real_find_spec(name, *args, **kwargs)

    soundfont._soundfont_bytes.cache_clear()
    monkeypatch.setattr(soundfont.importlib.util, "find_spec", no_pretty_midi)
    try:
        with pytest.raises(soundfont.SoundFontMissingError, match="pip install pretty_midi") as exc:
            _make(tmp_path / "bad", 4, 0)
        assert isinstance(exc.value, ConfigError)
        assert not (tmp_path / "bad" / "events.json").exists()
        with pytest.raises(soundfont.SoundFontMissingError, match="pip install pretty_midi"):
            soundfont.soundfont_path()

        # the package is there, the SoundFont is not
        empty = importlib.machinery.ModuleSpec("pretty_midi", None, is_package=True)
        empty.submodule_search_locations = [str(tmp_path)]
        monkeypatch.setattr(soundfont.importlib.util, "find_spec",
                            lambda name, *a, **k: empty if name == "pretty_midi"
                            else real_find_spec(name, *a, **k))
        with pytest.raises(soundfont.SoundFontMissingError,
                           match=r"TimGM6mb\.sf2 is not in .*pip install --force-reinstall"):
            soundfont.soundfont_path()
    finally:
        soundfont._soundfont_bytes.cache_clear()
    monkeypatch.undo()
    assert soundfont.soundfont_path().name == "TimGM6mb.sf2"


def test_missing_synthesiser_names_the_no_deps_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tinysoundfont", None)  # `import tinysoundfont` fails
    with pytest.raises(soundfont.SoundFontMissingError, match="--no-deps tinysoundfont") as exc:
        _make(tmp_path / "bad", 4, 0)
    assert "pip install --no-deps tinysoundfont" in str(exc.value)
    assert isinstance(exc.value, ConfigError)


# ------------------------------------------------------------------------------ variations


def test_class_subset_and_unknown_classes(tmp_path):
    info = _make(tmp_path / "pair", 8, 1, classes=["piano", "drums"])
    assert info.classes == ["piano", "drums"]
    assert {c.label for c in info.split("train")} == {"piano", "drums"}
    assert {c.label for c in info.clips} == {"piano", "drums"}
    events = json.loads((info.root / "events.json").read_text())
    assert events["classes"] == ["piano", "drums"] and events["dataset"] == "instruments"
    known = r"piano, guitar, violin, trumpet, flute, organ, marimba, drums"
    with pytest.raises(ConfigError, match=rf"unknown class 'banjo' of the instruments set.*{known}"):
        _make(tmp_path / "bad", 4, 0, classes=["piano", "banjo"])
    with pytest.raises(ConfigError, match=rf"unknown class 'chirp' of the instruments set.*{known}"):
        _make(tmp_path / "bad", 4, 0, classes=["piano", "chirp"])  # a shapes class
    with pytest.raises(ConfigError, match="--dataset must be one of shapes, instruments"):
        make_dataset(tmp_path / "bad", 4, 0, duration=1.0, progress=False, dataset="bogus")
    assert not (tmp_path / "bad").exists()


def test_cli_writes_an_instruments_set(tmp_path, capsys):
    out = tmp_path / "cli"
    main(["--out", str(out), "--n", "4", "--seed", "0", "--duration", "1.0", "--size", "64",
          "--dataset", "instruments", "--classes", "violin, marimba"])
    assert "data.data_root=" in capsys.readouterr().out
    events = json.loads((out / "events.json").read_text())
    assert events["dataset"] == "instruments" and events["classes"] == ["violin", "marimba"]
    for clip in events["clips"]:
        details = clip["details"]
        assert set(details) == {"pitches", "velocity"}
        assert len(details["pitches"]) == len(clip["onsets"]) and 50 <= details["velocity"] <= 127
    info = load_dataset_info(out)
    assert info.dataset == "instruments" and [c.details for c in info.clips] == \
        [c["details"] for c in events["clips"]]
    wave, sr = sf.read(out / info.clips[0].audio_path)
    assert sr == 16000 and wave.size == 16000
    assert main(["--out", str(tmp_path / "bad"), "--dataset", "bogus"]) == 2  # argparse choices: usage error
    assert not (tmp_path / "bad").exists()
