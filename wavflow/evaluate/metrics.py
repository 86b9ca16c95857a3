"""The metric formulas, on embeddings / logits already extracted (no networks here).

Conventions follow MMAudio's evaluation (av-benchmark), so figures compare with published ones:

* FD: Fréchet distance between Gaussians fitted to the two embedding sets (mean, unbiased
  covariance), with the matrix square root from scipy; a singular product retries with 1e-6
  added to both diagonals.
* KL: KL(reference || generated) of each pair's class distribution, summed over classes and
  averaged over pairs. Softmax over the logits (PaSST, PANNs: "KL-softmax", the published KL);
  the sigmoid variant (per-class Bernoulli terms summed) is reported beside it.
* IS: exp(E_x KL(p(y|x) || p(y))) with softmax over logits, in double precision, on `splits`
  shuffled chunks (seed 2020); mean and std over the chunks.
* IB-score / CLAP score: mean cosine similarity of paired embeddings.
* DeSync: |offset| (seconds) of the offset class Synchformer predicts, averaged over the first
  and the last 14-segment window of every clip.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg


def frechet_distance(gen: np.ndarray, ref: np.ndarray, eps: float = 1e-6) -> float:
    """FD between Gaussians fitted to rows of `gen` (N, D) and `ref` (M, D); N, M >= 2."""
    gen, ref = np.asarray(gen, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if gen.ndim != 2 or ref.ndim != 2 or gen.shape[1] != ref.shape[1]:
        raise ValueError(f"FD needs two (N, D) sets of equal D, got {gen.shape} and {ref.shape}")
    if min(len(gen), len(ref)) < 2:
        raise ValueError(f"FD needs at least 2 embeddings per set, got {len(gen)} and {len(ref)}")
    s1, s2 = np.atleast_2d(np.cov(gen, rowvar=False)), np.atleast_2d(np.cov(ref, rowvar=False))
    return frechet_from_statistics(gen.mean(axis=0), s1, ref.mean(axis=0), s2, eps)


def frechet_from_statistics(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                            eps: float = 1e-6) -> float:
    """|mu1-mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)): the one Fréchet formula of the project
    (the evaluation's FD and the demo metrics' log-mel Fréchet both call it). A non-finite
    square root retries with `eps` on both diagonals; an imaginary part that is more than
    numerical noise (a diagonal entry beyond 1e-3) is an error, not dropped."""
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FD: matrix square root has an imaginary part ({np.max(np.abs(covmean.imag)):.3g})")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def kl_divergence(gen_logits: torch.Tensor, ref_logits: torch.Tensor) -> dict[str, float]:
    """Mean over pairs of KL(ref || gen); rows of the two (N, C) logit tensors are pairs."""
    if gen_logits.shape != ref_logits.shape or gen_logits.ndim != 2 or len(gen_logits) == 0:
        raise ValueError(f"KL needs two equal (N, C) logit tensors, got {tuple(gen_logits.shape)} and {tuple(ref_logits.shape)}")
    gen, ref = gen_logits.double(), ref_logits.double()
    n = len(gen)
    kl_softmax = F.kl_div(F.log_softmax(gen, dim=1), F.log_softmax(ref, dim=1), reduction="sum", log_target=True) / n
    # The sigmoid variant as the field computes it: the positive-class terms only.
    kl_sigmoid = F.kl_div(F.logsigmoid(gen), F.logsigmoid(ref), reduction="sum", log_target=True) / n
    return {"softmax": float(kl_softmax), "sigmoid": float(kl_sigmoid)}


def inception_score(logits: torch.Tensor, splits: int = 10, seed: int = 2020, shuffle: bool = True) -> dict[str, float]:
    """IS over softmax(logits) (N, C): mean and std of exp(mean KL(p(y|x) || p(y))) per chunk."""
    if logits.ndim != 2 or len(logits) == 0:
        raise ValueError(f"IS needs (N, C) logits, got {tuple(logits.shape)}")
    n = len(logits)
    if splits < 1 or splits > n:
        raise ValueError(f"IS: splits={splits} needs 1 <= splits <= number of clips ({n})")
    feats = logits
    if shuffle:
        feats = feats[np.random.RandomState(seed).permutation(n)]
    feats = feats.double()
    p, log_p = feats.softmax(dim=1), feats.log_softmax(dim=1)
    scores = []
    for i in range(splits):
        lo, hi = i * n // splits, (i + 1) * n // splits
        p_c, log_p_c = p[lo:hi], log_p[lo:hi]
        q = p_c.mean(dim=0, keepdim=True)
        scores.append(float((p_c * (log_p_c - q.log())).sum(dim=1).mean().exp()))
    return {"mean": float(np.mean(scores)), "std": float(np.std(scores))}


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity of paired rows (IB-score, CLAP score)."""
    if a.shape != b.shape or a.ndim != 2 or len(a) == 0:
        raise ValueError(f"cosine score needs two equal (N, D) tensors, got {tuple(a.shape)} and {tuple(b.shape)}")
    return float(F.cosine_similarity(a.double(), b.double(), dim=-1).mean())


def desync_from_logits(window_logits: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """(N, W, C) offset logits of W windows per clip -> (N,) mean |predicted offset| per clip."""
    top = window_logits.argmax(dim=-1)  # (N, W)
    return grid[top].abs().double().mean(dim=1)
