"""The whole job with every network present (random weights in the published file formats).

Each figure in metrics.json is recomputed here from the networks and from formulas written out in
this file (not `wavflow.evaluate.metrics`), so a swapped side, a wrong KL direction, a wrong formula
or a clip dropped from a group fails the test.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tests.media import sine, write_video, write_wav
from tests.test_evaluate_models import SMALL_IMAGEBIND
from tests.test_evaluate_synchformer import public_state_dict, small_cfg
from wavflow.audio import load_audio
from wavflow.evaluate import models as MD
from wavflow.evaluate.cli import main
from wavflow.features.synchformer_av import SynchformerAV

DUR = 5.0  # 14 Synchformer segments: the offset head's window, the shortest clip DeSync accepts
REPO = Path(__file__).resolve().parents[1]


# Independent references for the metric formulas (numpy, float64, other algorithms than the
# project's): conventions as in metrics.py's docstring, which follows MMAudio's av-benchmark.

def _fd_by_eigenvalues(x: np.ndarray, y: np.ndarray) -> float:
    """|mu_x - mu_y|^2 + tr Sx + tr Sy - 2 sum sqrt(eig(Sx^1/2 Sy Sx^1/2)), unbiased covariances.

    The symmetric product has the same eigenvalues as Sx Sy but is positive semi-definite, so no
    general matrix square root (the project's route) is needed; round-off negatives clip to 0."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    mx, my = x.mean(axis=0), y.mean(axis=0)
    sx = (x - mx).T @ (x - mx) / (len(x) - 1)
    sy = (y - my).T @ (y - my) / (len(y) - 1)
    w, v = np.linalg.eigh(sx)
    sx_half = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    cross = np.linalg.eigvalsh(sx_half @ sy @ sx_half)
    return float(np.sum((mx - my) ** 2) + np.trace(sx) + np.trace(sy) - 2 * np.sum(np.sqrt(np.clip(cross, 0.0, None))))


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _kl_by_definition(gen_logits: torch.Tensor, ref_logits: torch.Tensor) -> tuple[float, float]:
    """(softmax, sigmoid) KL(ref || gen): summed over classes, averaged over the paired clips.

    Softmax: sum_c p_ref,c (log p_ref,c - log p_gen,c). Sigmoid: the positive-class Bernoulli terms
    only, sum_c s(r_c) (log s(r_c) - log s(g_c)). Both in the log domain, hence no epsilon."""
    g, r = gen_logits.double().numpy(), ref_logits.double().numpy()
    lg, lr = _log_softmax(g), _log_softmax(r)
    softmax = np.mean(np.sum(np.exp(lr) * (lr - lg), axis=1))
    log_sig_g, log_sig_r = -np.logaddexp(0.0, -g), -np.logaddexp(0.0, -r)  # log s(z) = -log(1 + e^-z)
    sigmoid = np.mean(np.sum(np.exp(log_sig_r) * (log_sig_r - log_sig_g), axis=1))
    return float(softmax), float(sigmoid)


def _is_by_entropies(logits: torch.Tensor, splits: int, seed: int) -> float:
    """Mean over chunks of exp(H(p(y)) - E_x H(p(y|x))), the entropy form of exp(E_x KL(p(y|x) || p(y))).

    Chunks as the field draws them: rows permuted by RandomState(seed), chunk i = rows
    [i n // splits, (i + 1) n // splits)."""
    n = len(logits)
    lp = _log_softmax(logits.double().numpy()[np.random.RandomState(seed).permutation(n)])
    scores = []
    for i in range(splits):
        chunk = lp[i * n // splits:(i + 1) * n // splits]
        marginal = np.exp(chunk).mean(axis=0)
        h_marginal = -np.sum(marginal * np.log(marginal))
        h_conditional = -np.mean(np.sum(np.exp(chunk) * chunk, axis=1))
        scores.append(np.exp(h_marginal - h_conditional))
    return float(np.mean(scores))


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("eval_weights")
    torch.manual_seed(0)
    torch.save({"model": MD.PannsNet().net.state_dict()}, cache / MD.WEIGHTS["panns"].filename)
    torch.save(MD.VggishNet().net.state_dict(), cache / MD.WEIGHTS["vggish"].filename)
    torch.save(MD.ImageBindNet(SMALL_IMAGEBIND).net.state_dict(), cache / MD.WEIGHTS["imagebind"].filename)
    torch.save(public_state_dict(SynchformerAV(small_cfg())), cache / MD.WEIGHTS["synchformer"].filename)
    return cache


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval_data")
    rng = np.random.default_rng(0)
    rows, infer = [], []
    ids = ["v1", "v2", "t1", "t2"]
    for i, rid in enumerate(ids):
        noise = rng.standard_normal(int(DUR * 16000)).astype(np.float32) * 0.05
        write_wav(root / "gen" / f"{rid}.wav", sine(220 * (i + 1), DUR, 16000) + noise, 16000)
        write_wav(root / "ref" / f"{rid}.wav", sine(330 * (i + 1), DUR + 1, 44100, amp=0.3), 44100)
        video = ""
        if rid.startswith("v"):
            video = f"video/{rid}.mp4"
            write_video(root / video, seconds=DUR + 0.5, size=(96, 64))
        rows.append({"id": rid, "audio_path": f"ref/{rid}.wav", "video_path": video, "caption": f"caption {rid}"})
        infer.append({"id": rid, "video_path": video, "caption": f"caption {rid}",
                      "video_exist": int(bool(video)), "text_exist": 1})
    pd.DataFrame(rows).to_csv(root / "reference.csv", index=False)
    pd.DataFrame(infer).to_csv(root / "infer.csv", index=False)
    return {"root": root, "gen": root / "gen", "reference": root / "reference.csv", "infer": root / "infer.csv",
            "ids": ids}  # type: ignore[dict-item]


# PaSST (86 M parameters, 10 s input) takes ~13 s per clip on one CPU thread: its file format and
# outputs are tested in test_evaluate_models, its wiring (32 kHz, sides) in test_extractor_inputs.
NO_PASST = "metrics.enabled=[FD_PANNs,FD_VGGish,KL_PANNs,IS_PANNs,IB_score,DeSync,CLAP_score]"


def _overrides(weights: Path) -> list[str]:
    return [f"weights.cache_dir={weights}", f"data.audio_duration={DUR}", "metrics.is_splits=2", NO_PASST,
            "+architectures.imagebind=" + json.dumps(SMALL_IMAGEBIND),
            '+architectures.synchformer={"visual": "tiny", "ast_layers": 1, "ast_intermediate": 64, '
            '"agg_ff_dim": 64, "head_layers": 1}']


@pytest.mark.slow
def test_every_metric_matches_a_direct_computation(weights: Path, data: dict, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    code = main(["--generated", str(data["gen"]), "--reference", str(data["reference"]), "--infer-csv",
                 str(data["infer"]), "--out", str(out), *_overrides(weights)])
    report = json.loads((out / "metrics.json").read_text())
    # CLAP (its weights and Hugging Face text encoder are absent here) is the only metric left out
    assert list(report["not_computed"]) == ["CLAP_score"]
    assert MD.WEIGHTS["clap"].filename in report["not_computed"]["CLAP_score"]
    assert code == 1 and report["pairing"]["paired"] == 4 and report["clip_problems"] == {}
    groups = report["groups"]
    assert {g: groups[g]["clips"] for g in groups} == {"overall": 4, "VT2A": 2, "T2A": 2}

    ids = data["ids"]
    panns = MD.PannsNet.from_file(weights / MD.WEIGHTS["panns"].filename)
    vggish = MD.VggishNet.from_file(weights / MD.WEIGHTS["vggish"].filename)

    def wave(path: Path, sr: int) -> torch.Tensor:
        w = load_audio(path, sr)
        return (w - w.mean())[: int(sr * DUR)]

    with torch.no_grad():
        gen = {i: data["gen"] / f"{i}.wav" for i in ids}
        ref = {i: data["root"] / "ref" / f"{i}.wav" for i in ids}
        pn = {s: {i: panns(wave(p[i], 16000)[None]) for i in ids} for s, p in (("gen", gen), ("ref", ref))}
        vg = {s: {i: vggish(wave(p[i], 16000)) for i in ids} for s, p in (("gen", gen), ("ref", ref))}

    def cat(d: dict, side: str, k: int, sel: list[str]) -> torch.Tensor:
        return torch.cat([d[side][i][k] for i in sel])

    for group, sel in (("overall", ids), ("T2A", ["t1", "t2"])):
        got = groups[group]["metrics"]
        assert got["FD_PANNs"]["value"] == pytest.approx(
            _fd_by_eigenvalues(cat(pn, "gen", 1, sel).numpy(), cat(pn, "ref", 1, sel).numpy()), rel=1e-4)
        g_v = torch.cat([vg["gen"][i] for i in sel]).numpy()
        r_v = torch.cat([vg["ref"][i] for i in sel]).numpy()
        assert got["FD_VGGish"]["value"] == pytest.approx(_fd_by_eigenvalues(g_v, r_v), rel=1e-4)
        kl_softmax, kl_sigmoid = _kl_by_definition(cat(pn, "gen", 0, sel), cat(pn, "ref", 0, sel))
        assert got["KL_PANNs"]["value"] == pytest.approx(kl_softmax, rel=1e-4)
        assert got["KL_PANNs"]["sigmoid"] == pytest.approx(kl_sigmoid, rel=1e-4)
        # metrics.is_splits=2, seed 2020 (the default metrics.is_seed). Random-weight PANNs predict
        # nearly uniform classes (IS - 1 ~ 1e-7), so compare log IS = E_x KL, which a wrong log base
        # or chunking changes by far more than 1 %.
        is_ref = _is_by_entropies(cat(pn, "gen", 0, sel), 2, 2020)
        assert math.log(got["IS_PANNs"]["value"]) == pytest.approx(math.log(is_ref), rel=1e-2, abs=1e-12)
        assert got["KL_PANNs"]["n"] == got["FD_VGGish"]["n"] == len(sel)
    # IB-score and DeSync rest on the clips with video only
    for group in ("overall", "VT2A"):
        assert groups[group]["metrics"]["IB_score"]["n"] == 2
        assert groups[group]["metrics"]["DeSync"]["n"] == 2
        assert 0.0 <= groups[group]["metrics"]["DeSync"]["value"] <= 2.0
        assert -1.0 <= groups[group]["metrics"]["IB_score"]["value"] <= 1.0
    assert "IB_score" in groups["T2A"]["skipped"]


@pytest.mark.slow
def test_launcher_runs_the_job(weights: Path, data: dict, tmp_path: Path) -> None:
    out = tmp_path / "eval_launcher"
    proc = subprocess.run(
        ["bash", str(REPO / "scripts/launch/evaluate.sh"), "--generated", str(data["gen"]), "--reference",
         str(data["reference"]), "--out", str(out), f"weights.cache_dir={weights}", f"data.audio_duration={DUR}",
         "metrics.enabled=[FD_PANNs,KL_PANNs,IS_PANNs]"],
        capture_output=True, text=True, timeout=600, env={**__import__("os").environ, "WAVFLOW_PYTHON": sys.executable},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "FD_PANNs (lower better)" in proc.stdout and "overall (4 clips)" in proc.stdout
    report = json.loads((out / "metrics.json").read_text())
    assert report["not_computed"] == {} and report["groups"]["overall"]["metrics"]["KL_PANNs"]["n"] == 4
