"""Means with percentile-bootstrap intervals over prompts, the same resamples for every statistic over the same
prompts, so that numbers of different variants from the same noise are paired."""

from __future__ import annotations

import numpy as np

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


def mean_with_interval(values: np.ndarray) -> dict:
    """``values[prompt, seed]`` -> ``{"mean", "ci95"}``: the mean and its percentile-bootstrap 95% interval, resampling
    prompts (all seeds of a drawn prompt kept)."""
    prompt_means = values.mean(axis=1)
    count = len(prompt_means)
    draws = np.random.default_rng(BOOTSTRAP_SEED).integers(0, count, (BOOTSTRAP_RESAMPLES, count))
    low, high = np.percentile(prompt_means[draws].mean(axis=1), [2.5, 97.5])
    return {"mean": float(values.mean()), "ci95": [float(low), float(high)]}
