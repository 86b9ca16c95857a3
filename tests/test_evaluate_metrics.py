"""Metric formulas against closed forms and hand-computed distributions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wavflow.evaluate import metrics as M
from wavflow.evaluate.run import ClipFeatures, group_metrics


def _gaussian_samples(mu: np.ndarray, cov: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n samples whose sample mean and unbiased covariance are exactly mu and cov."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, len(mu)))
    z -= z.mean(axis=0)
    # whiten to identity sample covariance, then colour to `cov`
    c = np.cov(z, rowvar=False)
    z = z @ np.linalg.inv(np.linalg.cholesky(c)).T
    return z @ np.linalg.cholesky(cov).T + mu


def test_fd_equals_closed_form_on_known_gaussians() -> None:
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    a = np.array([[2.0, 0.3, 0.0], [0.3, 1.0, 0.2], [0.0, 0.2, 0.5]])
    b = np.diag([1.0, 4.0, 0.25])
    x, y = _gaussian_samples(mu1, a, 200, 0), _gaussian_samples(mu2, b, 300, 1)
    # direct formula: |mu1-mu2|^2 + Tr(A + B - 2 (A^1/2 B A^1/2)^1/2)
    w, v = np.linalg.eigh(a)
    a_half = v @ np.diag(np.sqrt(w)) @ v.T
    w2, v2 = np.linalg.eigh(a_half @ b @ a_half)
    cross = v2 @ np.diag(np.sqrt(w2)) @ v2.T
    expected = float(np.sum((mu1 - mu2) ** 2) + np.trace(a + b - 2 * cross))
    assert M.frechet_distance(x, y) == pytest.approx(expected, rel=1e-9)
    # commuting (diagonal) case by hand: sum (mu diff)^2 + sum (sqrt(a_i) - sqrt(b_i))^2
    d1, d2 = np.diag([4.0, 1.0]), np.diag([1.0, 9.0])
    x2, y2 = _gaussian_samples(np.zeros(2), d1, 50, 2), _gaussian_samples(np.array([3.0, 0.0]), d2, 60, 3)
    assert M.frechet_distance(x2, y2) == pytest.approx(9.0 + (2 - 1) ** 2 + (1 - 3) ** 2, rel=1e-9)
    assert M.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)


def test_fd_closed_form_for_rotated_covariances_and_a_pure_shift() -> None:
    # S1 = R diag(s1) R^T, S2 = R diag(s2) R^T share eigenvectors, so (S1 S2)^1/2 = R diag(sqrt(s1 s2)) R^T
    # and FD = |dmu|^2 + sum (s1 + s2 - 2 sqrt(s1 s2)), with non-diagonal matrices on both sides.
    rot, _ = np.linalg.qr(np.array([[1.0, 2.0, 0.0], [-1.0, 1.0, 3.0], [2.0, 0.0, 1.0]]))
    s1, s2 = np.array([4.0, 1.0, 0.25]), np.array([1.0, 9.0, 1.0])
    mu1, mu2 = np.array([1.0, -2.0, 0.5]), np.zeros(3)
    x = _gaussian_samples(mu1, rot @ np.diag(s1) @ rot.T, 80, 4)
    y = _gaussian_samples(mu2, rot @ np.diag(s2) @ rot.T, 120, 5)
    # 5.25 + (4 + 1 - 4) + (1 + 9 - 6) + (0.25 + 1 - 1) = 10.5
    assert M.frechet_distance(x, y) == pytest.approx(10.5, rel=1e-9)
    assert M.frechet_distance(y, x) == pytest.approx(10.5, rel=1e-9)
    # a shifted copy has the same covariance: FD = |shift|^2 = 1 + 4 + 0.25
    assert M.frechet_distance(x, x + np.array([1.0, -2.0, 0.5])) == pytest.approx(5.25, rel=1e-9)


def test_fd_needs_two_rows_and_equal_width() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        M.frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="equal D"):
        M.frechet_distance(np.zeros((4, 3)), np.zeros((4, 2)))


def test_kl_is_reference_to_generated_softmax_and_sigmoid() -> None:
    p_ref = np.array([[0.7, 0.2, 0.1], [0.25, 0.25, 0.5]])
    p_gen = np.array([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    # logits whose softmax gives the distributions (plus an offset softmax ignores)
    ref_logits, gen_logits = torch.tensor(np.log(p_ref) + 3.0), torch.tensor(np.log(p_gen) - 1.0)
    by_hand = np.mean([sum(r * math.log(r / g) for r, g in zip(pr, pg)) for pr, pg in zip(p_ref, p_gen)])
    kl = M.kl_divergence(gen_logits, ref_logits)
    assert kl["softmax"] == pytest.approx(by_hand, rel=1e-12)
    reverse = np.mean([sum(g * math.log(g / r) for r, g in zip(pr, pg)) for pr, pg in zip(p_ref, p_gen)])
    assert abs(kl["softmax"] - reverse) > 1e-3  # the direction matters and is KL(ref || gen)
    # sigmoid variant: sum_c s(r_c) (log s(r_c) - log s(g_c)), averaged over clips
    sig = lambda t: 1 / (1 + np.exp(-t))  # noqa: E731
    r, g = ref_logits.numpy(), gen_logits.numpy()
    by_hand_sig = np.mean(np.sum(sig(r) * (np.log(sig(r)) - np.log(sig(g))), axis=1))
    assert kl["sigmoid"] == pytest.approx(by_hand_sig, rel=1e-10)
    assert M.kl_divergence(ref_logits, ref_logits)["softmax"] == pytest.approx(0.0, abs=1e-12)


def test_kl_closed_forms_on_two_class_distributions() -> None:
    # pair 1: p_ref = (1/2, 1/2), p_gen = (1/4, 3/4); pair 2: identical (KL 0), so the mean over
    # pairs halves pair 1's value.
    ref = torch.tensor([[0.0, 0.0], [1.0, -1.0]], dtype=torch.float64)
    gen = torch.tensor([[0.0, math.log(3.0)], [1.0, -1.0]], dtype=torch.float64)
    kl = M.kl_divergence(gen, ref)
    # softmax: (1/2 log((1/2)/(1/4)) + 1/2 log((1/2)/(3/4))) / 2 = log(4/3) / 4
    # (the reverse direction would give (3/4 log(3/2) - 1/4 log 2) / 2)
    assert kl["softmax"] == pytest.approx(math.log(4.0 / 3.0) / 4, rel=1e-12)
    # sigmoid, positive-class terms only: s(ref) = (1/2, 1/2), s(gen) = (1/2, 3/4) on pair 1, so
    # (0 + 1/2 log((1/2)/(3/4))) / 2 = log(2/3) / 4; with the negative-class terms it would be log(4/3) / 4
    assert kl["sigmoid"] == pytest.approx(math.log(2.0 / 3.0) / 4, rel=1e-12)


def test_kl_of_identical_predictions_is_zero() -> None:
    logits = torch.randn(5, 7, generator=torch.Generator().manual_seed(1)) * 4
    assert M.kl_divergence(logits, logits.clone()) == {"softmax": pytest.approx(0.0, abs=1e-12),
                                                       "sigmoid": pytest.approx(0.0, abs=1e-12)}


def test_inception_score_by_hand() -> None:
    # Two confident, different classes: p(y) = (1/2, 1/2) -> IS = exp(log 2) = 2 with one split.
    logits = torch.tensor([[50.0, 0.0], [0.0, 50.0]])
    assert M.inception_score(logits, splits=1)["mean"] == pytest.approx(2.0, rel=1e-9)
    # identical rows: p(y|x) = p(y) -> IS = 1
    same = torch.tensor([[1.0, 2.0, 3.0]] * 6)
    assert M.inception_score(same, splits=3) == {"mean": pytest.approx(1.0), "std": pytest.approx(0.0, abs=1e-12)}
    # a general case computed by hand on one split (order-free)
    p = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8]])
    marg = p.mean(axis=0)
    expected = math.exp(np.mean([np.sum(row * np.log(row / marg)) for row in p]))
    assert M.inception_score(torch.tensor(np.log(p)), splits=1)["mean"] == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="splits"):
        M.inception_score(torch.zeros(3, 2), splits=4)


def test_inception_score_is_k_for_one_hot_predictions_spread_evenly_over_k_classes() -> None:
    k = 4
    classes = torch.arange(k).repeat(3)  # 0 1 2 3 0 1 2 3 0 1 2 3
    logits = F.one_hot(classes, k).double() * 60.0  # softmax one-hot to within e^-60
    # p(y) uniform, each p(y|x) one-hot: E_x KL = log k, IS = k (and the result does not depend on order)
    assert M.inception_score(logits, splits=1)["mean"] == pytest.approx(k, rel=1e-12)
    # unshuffled, each of the 3 chunks holds every class once: k in every chunk
    assert M.inception_score(logits, splits=3, shuffle=False) == {"mean": pytest.approx(k, rel=1e-12),
                                                                  "std": pytest.approx(0.0, abs=1e-9)}
    # all clips the same one-hot class: p(y|x) = p(y), IS = 1
    assert M.inception_score(logits[classes == 2], splits=1)["mean"] == pytest.approx(1.0, rel=1e-12)


def test_inception_score_splits_follow_the_seeded_shuffle() -> None:
    logits = torch.randn(20, 5, generator=torch.Generator().manual_seed(0)) * 3
    perm = np.random.RandomState(2020).permutation(20)
    chunks = [logits[perm][i * 4:(i + 1) * 4].double() for i in range(5)]
    scores = []
    for c in chunks:
        pc = c.softmax(1)
        scores.append(float((pc * (pc.log() - pc.mean(0, keepdim=True).log())).sum(1).mean().exp()))
    out = M.inception_score(logits, splits=5, seed=2020)
    assert out["mean"] == pytest.approx(np.mean(scores), rel=1e-12)
    assert out["std"] == pytest.approx(np.std(scores), rel=1e-12)


def test_desync_takes_abs_offset_of_argmax_and_averages_windows() -> None:
    grid = torch.linspace(-2, 2, 21)
    logits = torch.zeros(2, 2, 21)
    logits[0, 0, 0] = 5  # -2.0 s
    logits[0, 1, 12] = 5  # +0.4 s
    logits[1, 0, 10] = 5  # 0 s
    logits[1, 1, 9] = 5  # -0.2 s
    out = M.desync_from_logits(logits, grid)
    assert out.tolist() == pytest.approx([1.2, 0.1])


def test_mean_cosine() -> None:
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[0.0, 2.0], [2.0, 2.0]])
    assert M.mean_cosine(a, b) == pytest.approx(0.5)


def test_group_metrics_uses_only_the_group_and_reports_what_it_cannot_form() -> None:
    gen = torch.tensor([[0.0, 1.0], [1.0, 0.0], [2.0, 2.0]])
    ref = torch.tensor([[0.5, 1.0], [1.0, 0.5], [2.0, 1.0]])
    feats = {
        f"c{i}": ClipFeatures(gen={"panns_logits": gen[i], "panns_emb": gen[i]},
                              ref={"panns_logits": ref[i], "panns_emb": ref[i]}, ib=0.1 * i)
        for i in range(3)
    }
    values, skipped = group_metrics(["c0", "c1"], feats, ["KL_PANNs", "FD_PANNs", "IB_score", "DeSync"], is_splits=10,
                                    is_seed=2020)
    assert values["KL_PANNs"]["n"] == 2
    # both pairs: softmax([a, b]) = (s(a - b), s(b - a)); ref (s(-1/2), s(1/2)), gen (s(-1), s(1))
    # (mirrored in pair 2, same KL)
    sig = lambda t: 1 / (1 + math.exp(-t))  # noqa: E731
    kl_pair = sig(0.5) * math.log(sig(0.5) / sig(1.0)) + sig(-0.5) * math.log(sig(-0.5) / sig(-1.0))
    assert values["KL_PANNs"]["value"] == pytest.approx(kl_pair, rel=1e-9)
    # gen rows (0, 1), (1, 0): mean (1/2, 1/2), covariance u u^T with u = (1, -1)/sqrt 2; ref rows
    # (1/2, 1), (1, 1/2): mean (3/4, 3/4), covariance u u^T / 4. FD = 2/16 + (1 - 1/2)^2 = 0.375
    assert values["FD_PANNs"]["value"] == pytest.approx(0.375, rel=1e-6)
    assert values["IB_score"] == {"value": pytest.approx(0.05), "n": 2}
    assert "DeSync" in skipped and "DeSync" not in values
    one, skipped_one = group_metrics(["c2"], feats, ["FD_PANNs", "IS_PANNs"], is_splits=10, is_seed=2020)
    assert "FD_PANNs" in skipped_one and one["IS_PANNs"]["splits"] == 1
