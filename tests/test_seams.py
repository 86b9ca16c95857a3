"""The seam measures of long-form clips (wavflow.demo.seams): a click or a level step at a
window junction shows; the same audio without it does not."""

from __future__ import annotations

import numpy as np

from wavflow.demo.seams import seam_scores

SR = 16000


def _noise(seconds: float, seed: int, level: float = 0.1) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, level, int(SR * seconds))


def test_steady_audio_has_no_seam():
    real, generated = _noise(4, 0), _noise(4, 1)
    s = seam_scores(generated, real, [16000, 32000, 48000], SR)
    assert s["no_click"] and s["level_jump_db_within_real_spread"] and s["spectral_flux_db_within_real_spread"]
    assert abs(s["level_jump_db_excess"]) < 0.5


def test_a_click_at_a_junction_is_found():
    real, generated = _noise(4, 0), _noise(4, 1)
    generated[32000] += 0.9  # one sample jumps: a click at the second junction
    s = seam_scores(generated, real, [16000, 32000, 48000], SR)
    assert not s["no_click"] and s["click_step_at_junctions"] > s["click_step_p99_elsewhere"]


def test_a_level_step_at_every_junction_is_found():
    real = _noise(4, 0)
    generated = np.concatenate([_noise(1, k + 1, level=0.1 if k % 2 == 0 else 0.5) for k in range(4)])
    s = seam_scores(generated, real, [16000, 32000, 48000], SR)
    assert s["level_jump_db_excess"] > 6 and not s["level_jump_db_within_real_spread"]
    assert s["generated_level_jump_db"]["junction_median"] > 10
