"""The feature-quality report: a degenerate stream is flagged, an informative one is not, and
every figure matches its definition on data where the answer is known."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from wavflow.features import report as rep

CLASSES = ["a", "b", "c"]


def _write_set(root: Path, *, informative: bool, n: int = 24, seed: int = 0) -> tuple[Path, Path]:
    """n clips of 3 classes: text (6, 16), clip frames (4, 16) and sync (16, 8) features.
    Informative: a class direction and a step at the onset token; degenerate: one shared
    vector plus 1e-5 noise."""
    g = torch.Generator().manual_seed(seed)
    shared_text, shared_clip, shared_sync = (torch.randn(d, generator=g) for d in (16, 16, 8))
    class_dirs = torch.randn(3, 16, generator=g) * 3
    rows, meta = ["id,audio_path,features_path,video_exist,text_exist"], ["id,label,onsets"]
    for i in range(n):
        label = CLASSES[i % 3]
        onset_token = 2 + (i % 5)  # tokens of segment 0 start every 80 ms
        onset = rep.sync_token_start_times(16)[onset_token]
        noise = lambda *s: torch.randn(*s, generator=g) * 1e-5  # noqa: E731
        if informative:
            text = shared_text + class_dirs[i % 3] + 0.3 * torch.randn(6, 16, generator=g)
            clip = shared_clip + class_dirs[i % 3] + 0.3 * torch.randn(4, 16, generator=g)
            sync = shared_sync.repeat(16, 1) + 0.05 * torch.randn(16, 8, generator=g)
            sync[onset_token:8] += 5.0  # the event shows from its token on (segment 0)
        else:
            text, clip, sync = (shared_text + noise(6, 16), shared_clip + noise(4, 16),
                                shared_sync + noise(16, 8))
        path = root / f"c{i}.pth"
        torch.save({"text_features": text, "clip_features": clip, "sync_features": sync}, path)
        rows.append(f"c{i},x.wav,{path},1,1")
        meta.append(f"c{i},{label},{onset:.4f}")
    csv, meta_csv = root / "train.csv", root / "meta.csv"
    csv.write_text("\n".join(rows) + "\n")
    meta_csv.write_text("\n".join(meta) + "\n")
    return csv, meta_csv


def test_degenerate_stream_is_flagged(tmp_path):
    import pandas as pd

    csv, meta = _write_set(tmp_path, informative=False)
    report, _ = rep.analyse_csv(csv, meta=pd.read_csv(meta, dtype=str, keep_default_na=False), progress=False)
    for name in rep.STREAMS:
        s = report["streams"][name]
        assert s["mean_cosine"] > 0.999
        assert s["across_clip_rel_std"] < 1e-3
        assert "near-constant across clips" in s["warning"]
    assert len(report["warnings"]) == 3
    assert report["streams"]["clip_features"]["nn_class_accuracy"] < 0.7  # noise: no class signal


def test_informative_stream_scores_and_is_not_flagged(tmp_path):
    import pandas as pd

    csv, meta = _write_set(tmp_path, informative=True)
    report, stats = rep.analyse_csv(csv, meta=pd.read_csv(meta, dtype=str, keep_default_na=False),
                                    progress=False, encoder_identity="test-enc")
    assert report["warnings"] == []
    clip = report["streams"]["clip_features"]
    assert clip["nn_class_accuracy"] == 1.0 and clip["nn_class_chance"] == pytest.approx(1 / 3)
    assert clip["mean_cosine"] < 0.8
    sync = report["streams"]["sync_features"]
    assert sync["onset_change_hit_rate"] == 1.0 and sync["onset_clips"] == 24
    # chance: positions within 80 ms of the onset among the 14 in-segment change positions
    assert 0 < sync["onset_change_chance"] < 0.4
    assert stats.encoder_identity == "test-enc" and stats.rows["sync_features"] == 24


def test_figures_match_their_definitions():
    rng = np.random.default_rng(0)
    # isotropic data in k of 32 dims: participation ratio ~ k
    tokens = np.zeros((4000, 32))
    tokens[:, :5] = rng.standard_normal((4000, 5))
    feats = [torch.tensor(tokens[i * 40:(i + 1) * 40], dtype=torch.float32) for i in range(100)]
    s = rep.stream_report("clip_features", feats, None, None)
    assert s["effective_rank"] == pytest.approx(5.0, rel=0.05)
    assert s["time_variance_share"] == pytest.approx(1.0, abs=0.05)  # i.i.d. tokens: all variance is within clips
    # constant within each clip: all variance is across clips
    per_clip = [torch.full((3, 4), float(v)) for v in rng.standard_normal(50)]
    s = rep.stream_report("text_features", per_clip, None, None)
    assert s["time_variance_share"] == pytest.approx(0.0, abs=1e-9)
    # two clips: cosine of their flattened features
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    s = rep.stream_report("text_features", [a, b], None, None)
    assert s["mean_cosine"] == pytest.approx(float(torch.nn.functional.cosine_similarity(
        a.reshape(1, -1), b.reshape(1, -1))), abs=1e-6)


def test_token_times_follow_the_synchformer_layout():
    t = rep.sync_token_start_times(24)
    assert t[:8] == pytest.approx(np.arange(8) * 0.08)  # 2 frames at 25 fps per token
    assert t[8] == pytest.approx(8 / 25)  # segments start every 8 frames
    assert t[17] == pytest.approx((16 + 2) / 25)


def test_cli_json_names_streams_as_in_the_files(tmp_path, capsys):
    csv, meta = _write_set(tmp_path, informative=True, n=9)
    assert rep.main(["--csv", str(csv), "--meta", str(meta), "--json", "--write-stats",
                     "--encoder-identity", "mine"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["streams"]) == {"text_features", "clip_features", "sync_features"}
    for s in out["streams"].values():
        assert {"mean_cosine", "effective_rank"} <= set(s)
    stats = rep.FeatureStats.load(tmp_path / rep.STATS_FILENAME)
    assert stats.encoder_identity == "mine" and stats.rows["text_features"] == 9
    assert rep.main(["--csv", str(tmp_path / "nope.csv")]) == 3  # bad input
