"""Confidence intervals of ``kvcompress eval``: percentile bootstrap over prompts.

A configuration's accuracy is the mean of its per-prompt scores; its 95% interval is the 2.5th
and 97.5th percentiles of the means of ``resamples`` resamples of the prompts, drawn with
replacement (Efron's percentile bootstrap). Two configurations answered on the same prompts are
compared with a *paired* bootstrap: the prompts are resampled together, so the interval is that
of the mean per-prompt difference, which is narrower than two independent intervals suggest
when the two configurations succeed and fail on the same prompts.

The seed is fixed: a report computed twice from the same predictions has the same intervals.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

RESAMPLES = 1000
SEED = 0
LEVEL = 0.95


def bootstrap_ci(scores: Sequence[float], resamples: int = RESAMPLES, seed: int = SEED,
                 level: float = LEVEL) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean of ``scores``.

    Args:
        scores: one score per prompt (0..1).
        resamples: number of bootstrap resamples.
        seed: seed of the resampling (fixed, so reports are reproducible).
        level: coverage, e.g. 0.95.

    Returns:
        ``(low, high)``, or None for no scores. All-equal scores give ``(x, x)``.
    """
    if len(scores) == 0:
        return None
    values = np.asarray(scores, dtype=np.float64)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(values), size=(resamples, len(values)))
    means = values[picks].mean(axis=1)
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(means, [tail, 100.0 - tail])
    # Guard against float noise outside the observed range (e.g. 1.0000000000000002).
    low = max(float(low), float(values.min()))
    high = min(float(high), float(values.max()))
    return low, high


def paired_bootstrap_ci(first: Sequence[float], second: Sequence[float],
                        resamples: int = RESAMPLES, seed: int = SEED,
                        level: float = LEVEL) -> tuple[float, float] | None:
    """Percentile bootstrap interval of ``mean(first - second)``, prompts resampled in pairs.

    Args:
        first: scores of one configuration, one per prompt.
        second: scores of the other on the same prompts, in the same order.
        resamples: number of bootstrap resamples.
        seed: seed of the resampling.
        level: coverage, e.g. 0.95.

    Returns:
        ``(low, high)`` of the mean difference, or None for no prompts.

    Raises:
        ValueError: the two lists differ in length (not paired).
    """
    if len(first) != len(second):
        raise ValueError(f"paired scores differ in length: {len(first)} vs {len(second)}")
    diffs = [a - b for a, b in zip(first, second, strict=True)]
    return bootstrap_ci(diffs, resamples=resamples, seed=seed, level=level)
