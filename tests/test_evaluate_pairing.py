"""Pairing by id, missing / unreadable reports, per-mode grouping, the job without weights."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch
import pytest

from tests.media import sine, write_wav
from wavflow.errors import ManifestError
from wavflow.evaluate.cli import main
from wavflow.evaluate.pairing import pair_by_id
from wavflow.evaluate.run import ClipFeatures, compute_report


def _csv(path: Path, rows: list[dict]) -> Path:
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.fixture()
def layout(tmp_path: Path) -> dict[str, Path]:
    """gen/ (predict output with summary.csv), ref/ wavs, reference.csv, infer.csv."""
    gen, ref = tmp_path / "gen", tmp_path / "ref"
    for i, rid in enumerate(["a", "b", "c", "d_wavflow"]):
        write_wav(gen / f"{rid}.wav", sine(200 + 50 * i, 1.0, 16000), 16000)
    _csv(gen / "summary.csv", [
        {"id": "a", "status": "ok", "seconds": 1.0, "wav_path": str(gen / "a.wav"), "mp4_path": "", "reason": ""},
        {"id": "b", "status": "ok", "seconds": 1.0, "wav_path": str(gen / "b.wav"), "mp4_path": "", "reason": ""},
        {"id": "c", "status": "skipped_exists", "seconds": 0, "wav_path": str(gen / "c.wav"), "mp4_path": "", "reason": ""},
        # an input clash renamed the output: the id stays d
        {"id": "d", "status": "ok", "seconds": 1.0, "wav_path": str(gen / "d_wavflow.wav"), "mp4_path": "", "reason": ""},
        {"id": "e", "status": "failed", "seconds": 0, "wav_path": "", "mp4_path": "", "reason": "video not found: x.mp4"},
        {"id": "x", "status": "ok", "seconds": 1.0, "wav_path": str(gen / "a.wav"), "mp4_path": "", "reason": ""},
    ])
    for rid in ["a", "b", "c", "d", "e", "f"]:
        write_wav(ref / f"{rid}.wav", sine(300, 1.0, 44100), 44100)
    (ref / "c.wav").write_bytes(b"RIFF garbage")  # unreadable reference
    reference = _csv(tmp_path / "reference.csv", [
        {"id": rid, "audio_path": f"ref/{rid}.wav", "video_path": "", "caption": f"sound {rid}" if rid != "b" else ""}
        for rid in ["a", "b", "c", "d", "e", "f"]
    ])
    infer = _csv(tmp_path / "infer.csv", [
        {"id": "a", "video_path": "a.mp4", "caption": "dog", "video_exist": 1, "text_exist": 1},
        {"id": "b", "video_path": "b.mp4", "caption": "", "video_exist": 1, "text_exist": 0},
        {"id": "c", "video_path": "", "caption": "rain", "video_exist": 0, "text_exist": 1},
        {"id": "d", "video_path": "", "caption": "wind", "video_exist": 0, "text_exist": 1},
    ])
    return {"gen": gen, "reference": reference, "infer": infer, "root": tmp_path}


def test_pairs_by_id_and_reports_both_sides(layout: dict[str, Path]) -> None:
    p = pair_by_id(layout["gen"], layout["reference"])
    assert [x.id for x in p.pairs] == ["a", "b", "c", "d"]
    assert p.pairs[3].generated == layout["gen"] / "d_wavflow.wav"
    assert p.pairs[0].reference == (layout["root"] / "ref" / "a.wav").absolute()  # relative to the CSV
    assert p.missing_generated == {"e": "predict failed: video not found: x.mp4", "f": "no generated wav for this id"}
    assert p.missing_reference == {"x": "id not in the reference CSV"}
    assert p.pairs[0].caption == "sound a" and p.pairs[1].caption is None
    assert all(x.mode is None for x in p.pairs)


def test_modes_come_from_the_inference_csv(layout: dict[str, Path]) -> None:
    p = pair_by_id(layout["gen"], layout["reference"], layout["infer"])
    assert {x.id: x.mode for x in p.pairs} == {"a": "VT2A", "b": "V2A", "c": "T2A", "d": "T2A"}
    # the video of the inference row fills the reference CSV's empty video_path (V* modes only)
    assert p.pairs[1].video is not None and p.pairs[1].video.name == "b.mp4"
    assert p.pairs[2].video is None
    assert p.not_in_infer_csv == []


def test_folder_without_summary_pairs_wav_stems(tmp_path: Path, layout: dict[str, Path]) -> None:
    (layout["gen"] / "summary.csv").unlink()
    p = pair_by_id(layout["gen"], layout["reference"])
    assert [x.id for x in p.pairs] == ["a", "b", "c"]
    assert p.missing_reference == {"d_wavflow": "id not in the reference CSV"}
    with pytest.raises(ManifestError, match="no summary.csv and no .wav"):
        (tmp_path / "empty").mkdir()
        pair_by_id(tmp_path / "empty", layout["reference"])


def test_duplicate_reference_id_is_an_error(tmp_path: Path, layout: dict[str, Path]) -> None:
    dup = _csv(tmp_path / "dup.csv", [{"id": "a", "audio_path": "x.wav"}, {"id": "a", "audio_path": "y.wav"}])
    with pytest.raises(ManifestError, match="line 3: duplicate id 'a'"):
        pair_by_id(layout["gen"], dup)


def test_report_groups_by_mode_with_clip_counts(layout: dict[str, Path]) -> None:
    import torch

    p = pair_by_id(layout["gen"], layout["reference"], layout["infer"])
    feats = {}
    for k, pair in enumerate(p.pairs):
        t = torch.tensor([float(k), 1.0, -float(k)])
        feats[pair.id] = ClipFeatures(gen={"panns_logits": t, "panns_emb": t}, ref={"panns_logits": t * 0.5,
                                                                                    "panns_emb": t + 1})
    report = compute_report(p, feats, ["KL_PANNs", "FD_PANNs"], is_splits=10, is_seed=2020)
    assert {g: r["clips"] for g, r in report.items()} == {"overall": 4, "VT2A": 1, "T2A": 2, "V2A": 1}
    assert report["T2A"]["metrics"]["FD_PANNs"]["n"] == 2
    assert "FD_PANNs" in report["VT2A"]["skipped"]  # one clip: no covariance
    assert report["overall"]["metrics"]["KL_PANNs"]["n"] == 4


def test_job_without_any_weights_lists_every_metric_and_every_id(layout: dict[str, Path], tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "eval"
    cache = tmp_path / "no_weights"
    code = main(["--generated", str(layout["gen"]), "--reference", str(layout["reference"]), "--infer-csv",
                 str(layout["infer"]), "--out", str(out), f"weights.cache_dir={cache}"])
    assert code == 1
    report = json.loads((out / "metrics.json").read_text())
    assert set(report["not_computed"]) == {"FD_PaSST", "FD_PANNs", "FD_VGGish", "KL_PaSST", "KL_PANNs", "IS_PANNs",
                                           "IS_PaSST", "IB_score", "DeSync", "CLAP_score"}
    assert str(cache / "vggish-10086976.pth") in report["not_computed"]["FD_VGGish"]
    pairing = report["pairing"]
    assert pairing["paired"] == 4
    assert set(pairing["unreadable"]) == {"c"}
    assert pairing["unreadable"]["c"].startswith("reference: ")
    assert set(pairing["missing_generated"]) == {"e", "f"} and set(pairing["missing_reference"]) == {"x"}
    printed = capsys.readouterr().out
    assert "not computed: DeSync: Synchformer weights not found" in printed
    assert "missing_generated: f: no generated wav for this id" in printed


def test_bad_override_exits_2_and_no_pairs_3(layout: dict[str, Path], tmp_path: Path) -> None:
    args = ["--generated", str(layout["gen"]), "--reference", str(layout["reference"])]
    assert main(args + ["metrics.enabled=[FD_Nope]"]) == 2
    assert main(args + ["no.such.key=1"]) == 2
    other = _csv(tmp_path / "other.csv", [{"id": "zzz", "audio_path": "z.wav"}])
    assert main(["--generated", str(layout["gen"]), "--reference", str(other)]) == 3  # bad input


class _Recorder:
    """A stand-in network: records its input and returns features that identify the clip."""

    def __init__(self, dim: int) -> None:
        self.inputs: list[torch.Tensor] = []
        self.dim = dim

    def __call__(self, wave):
        self.inputs.append(wave.clone())
        # 'logits' that depend on the clip's loudness, so gen and ref differ
        level = wave.abs().mean().item()
        logits = torch.linspace(0, 1, self.dim)[None] * level * 50
        return logits, logits * 2


def test_extractor_feeds_each_network_its_rate_and_length_and_keeps_sides(layout: dict[str, Path]) -> None:
    import torch

    from wavflow.evaluate.metrics import kl_divergence
    from wavflow.evaluate.run import Extractor, extract_all

    (layout["root"] / "ref" / "c.wav").unlink()
    write_wav(layout["root"] / "ref" / "c.wav", sine(300, 1.0, 44100, amp=0.1), 44100)
    p = pair_by_id(layout["gen"], layout["reference"], layout["infer"])
    passt, panns = _Recorder(5), _Recorder(4)
    ex = Extractor({"passt": passt, "panns": panns}, device=torch.device("cpu"), duration=0.5, desync_segments=14)
    feats, problems = extract_all(p, ex)
    assert problems == {} and sorted(feats) == ["a", "b", "c", "d"]
    assert [tuple(w.shape) for w in passt.inputs] == [(1, 16000)] * 8  # 0.5 s at 32 kHz, 4 pairs x 2 sides
    assert [tuple(w.shape) for w in panns.inputs] == [(1, 8000)] * 8  # 0.5 s at 16 kHz
    assert all(abs(float(w.mean())) < 1e-3 for w in passt.inputs)  # mean removed
    report = compute_report(p, feats, ["KL_PaSST"], is_splits=10, is_seed=2020)
    gen = torch.stack([feats[i].gen["passt_logits"] for i in "abcd"])
    ref = torch.stack([feats[i].ref["passt_logits"] for i in "abcd"])
    assert not torch.allclose(gen, ref)
    assert report["overall"]["metrics"]["KL_PaSST"]["value"] == pytest.approx(kl_divergence(gen, ref)["softmax"])
    assert report["overall"]["metrics"]["KL_PaSST"]["value"] != pytest.approx(kl_divergence(ref, gen)["softmax"])
