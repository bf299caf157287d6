"""From a statistic to an amax: pure functions, one per calibration method (../specs/calibration.md)."""

from __future__ import annotations

import math

import numpy as np

from qdq.calibrate.histogram import Histogram
from qdq.scheme import INT8, Scheme

START_BIN = 128  # the first candidate threshold, in bins (TensorRT's entropy calibration)
LEVELS = 128  # int8 levels on one side of zero
ENTROPY_MIN_KEPT = 99.9  # percent of |x| the entropy threshold always keeps unclipped


def amax_percentile(hist: Histogram, percentile: float) -> float:
    """The smallest bin edge below which at least ``percentile`` % of all |x| lie."""
    if hist.total == 0 or hist.top == 0.0:
        return hist.amax
    cumulative = np.cumsum(hist.counts)
    # How many values must lie below: ceil(p% of all), with slack for 0.999 * 5000 = 4995.000000000001.
    needed = math.ceil(percentile / 100.0 * int(cumulative[-1]) - 1e-9)
    k = int(np.searchsorted(cumulative, needed, side="left")) + 1
    return min(float(hist.edges()[min(k, hist.num_bins)]), hist.amax)


def amax_entropy(hist: Histogram) -> float:
    """TensorRT's entropy calibration (EntropyCalibrator2), as pytorch-quantization publishes it.

    The histogram of |x| in ``num_bins`` (2048) bins over ``[0, amax]`` (:meth:`Histogram.over_max`), bin 0's
    count replaced by bin 1's (so the zeros after a ReLU do not dominate). For each candidate ``i`` from bin 128
    to ``num_bins``: P is the first ``i`` bins with every count beyond added to bin ``i-1``; Q splits the first
    ``i`` bins (without the outliers) into 128 groups (bin ``b`` in group ``floor(128·b/i)``) and spreads each
    group's count evenly over its non-empty bins. The chosen ``i`` minimises KL(P‖Q) (the largest ``i`` among
    equals); amax is its upper edge, ``i·amax/num_bins``. A candidate whose bin ``i-1`` is empty while values lie
    beyond it has infinite KL, as in the published code.

    One deviation, for degenerate data only: a threshold with fewer than two non-empty bins below it is never
    chosen (P and Q would both be one spike, KL 0 however much is clipped; 4-bit pixel data clipped at 1/16 of
    its range that way). See :func:`amax_entropy_guarded` for qdq's earlier, guarded variant.
    """
    if hist.amax == 0.0:
        return 0.0
    counts = hist.over_max()
    counts[0] = counts[1]
    divergence = kl_divergences(counts, smooth=False)
    best = len(divergence) - 1 - int(np.argmin(divergence[::-1]))
    return (START_BIN + best) * hist.amax / len(counts)


def amax_entropy_guarded(hist: Histogram) -> float:
    """Entropy calibration made safer than TensorRT's (``--method entropy-guarded``; qdq's default before 0.2).

    The same KL search as :func:`amax_entropy`, on the power-of-two grid :attr:`Histogram.counts` (``[0, top]``,
    the data filling between half and all of it), with two guards:
    - when bin ``i-1`` is empty but receives outliers, Q gets a pseudo-count of one sample there instead of 0
      (smoothing, as ncnn and MXNet do with an epsilon): otherwise KL is infinite for every threshold in a gap
      between the bulk and a few far outliers, and the threshold lands on an outlier;
    - the threshold never clips more than 0.1% of the values: on a Sigmoid's outputs, all in [0.5, 1), KL
      favoured clipping half of them.
    Computed in closed form from prefix sums, all candidates at once: O(candidates × 128).
    """
    if hist.top == 0.0:
        return hist.amax
    counts = hist.counts.astype(np.float64)
    counts[0] = counts[1]
    divergence = kl_divergences(counts, smooth=True)
    best = len(divergence) - 1 - int(np.argmin(divergence[::-1]))
    threshold = float(hist.edges()[START_BIN + best])
    # KL sees shapes, not magnitudes: for data in a narrow band away from zero (a Sigmoid's [0.5, 1)) a
    # threshold at the band's start looks lossless while clipping half the values. Never clip more than 0.1%.
    return min(max(threshold, amax_percentile(hist, ENTROPY_MIN_KEPT)), hist.amax)


def xlogx(x: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(x > 0, x * np.log(np.where(x > 0, x, 1.0)), 0.0)


def kl_divergences(counts: np.ndarray, start: int = START_BIN, levels: int = LEVELS, *, smooth: bool = True
                   ) -> np.ndarray:
    """KL(P‖Q) for every candidate ``i`` in ``[start, len(counts)]`` (see :func:`amax_entropy`).

    ``smooth``: the pseudo-count of :func:`amax_entropy_guarded` where bin ``i-1`` is empty but receives
    outliers; without it such a candidate's KL is infinite.

    With T the total count and S the total of Q's counts: KL = (1/T)·Σ_b P_b·log(P_b / Q_b) + log(S / T). Per
    group g (sum G_g over n_g non-empty bins) Σ_{b∈g} c_b·log(c_b / Q_b) = Σ c_b·log c_b − G_g·log(G_g / n_g),
    all from prefix sums of c, [c > 0] and c·log c; then bin i-1's term is redone with the outliers added.
    """
    n = len(counts)
    total = counts.sum()
    candidates = np.arange(start, n + 1)
    prefix = np.concatenate([[0.0], np.cumsum(counts)])
    nonzero = np.concatenate([[0], np.cumsum(counts > 0)])
    prefix_xlogx = np.concatenate([[0.0], np.cumsum(xlogx(counts))])

    # Group g of candidate i holds bins [ceil(g·i/128), ceil((g+1)·i/128)); bin i-1 is in the last group.
    bounds = (np.arange(levels + 1)[None, :] * candidates[:, None] + levels - 1) // levels
    group_sum = np.diff(prefix[bounds], axis=1)
    group_nonzero = np.diff(nonzero[bounds], axis=1)
    group_xlogx = np.diff(prefix_xlogx[bounds], axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        level = np.where(group_sum > 0, group_sum / np.maximum(group_nonzero, 1), 1.0)  # Q_b of a non-empty bin
    body = (group_xlogx - group_sum * np.log(level)).sum(axis=1)

    last = counts[candidates - 1]
    outliers = total - prefix[candidates]
    pseudo = (last == 0) & (outliers > 0)
    q_last = np.where(pseudo, 1.0, level[:, -1])
    p_last = last + outliers
    body += xlogx(p_last) - p_last * np.log(q_last) - (xlogx(last) - last * np.log(q_last))
    inside = prefix[candidates]
    with np.errstate(divide="ignore", invalid="ignore"):  # total is 0 when every value was 0 (bin 0 replaced)
        kl = body / total + np.log((inside + pseudo * smooth) / total)
    if not smooth:
        kl = np.where(pseudo, np.inf, kl)
    # With fewer than two non-empty bins below the threshold, P and Q are both one spike and KL is 0 whatever is
    # clipped (discrete data such as 8-bit pixels): such a threshold is never a candidate.
    return np.where(nonzero[candidates] >= 2, kl, np.inf)


# MSE weighs each value by its square, so the loud samples set the scale. Where samples differ in loudness by orders
# of magnitude (Silero VAD's STFT magnitudes: silent chunks peak near 0.07, voiced ones at 13-19), that scale rounds
# the quiet ones to zero, and the model cannot tell silence from faint noise. So MSE's amax is capped where the
# quietest tenth of the samples (with a non-zero value) would round to zero altogether. On two synthetic speech
# streams the speech probability read 11.8 and 16.4 dB from float's uncapped, 28.6 and 18.6 capped; a cap keeping
# 4 steps (amax 2) read 30.4 and 11.9: clipping the voiced peaks that hard costs as much as it saves. Images,
# pages and sentences peak within a few times of each other, far from the cap.
QUIET_SAMPLES = 0.1
QUIET_STEPS = 1


def quiet_cap(hist: Histogram, scheme: Scheme = INT8) -> float | None:
    """The largest amax at which the quietest samples' peak keeps QUIET_STEPS integer steps (None: no limit)."""
    if scheme.is_float:  # a float grid's steps shrink with the values: quiet runs keep their precision
        return None
    quiet = hist.quiet_peak(QUIET_SAMPLES)
    return None if quiet is None else quiet * scheme.qmax / QUIET_STEPS


def amax_mse(hist: Histogram, start: int = START_BIN, scheme: Scheme = INT8) -> float:
    """The bin edge (from bin 128 on) whose quantize→dequantize of the bin centres has the least squared error,
    at most :func:`quiet_cap`."""
    if hist.top == 0.0:
        return hist.amax
    edges = hist.edges()
    used = np.flatnonzero(hist.counts)
    centres = (edges[used] + edges[used + 1]) / 2
    weights = hist.counts[used].astype(np.float64)
    candidates = edges[start:]
    errors = np.empty(len(candidates))
    for lo in range(0, len(candidates), 256):  # blocks keep the candidates × bins matrix small
        amax = candidates[lo:lo + 256, None]
        dequantized = scheme.fake_quantize(centres[None, :], amax)
        errors[lo:lo + 256] = ((dequantized - centres[None, :]) ** 2 * weights[None, :]).sum(axis=1)
    best = min(float(candidates[int(np.argmin(errors))]), hist.amax)
    cap = quiet_cap(hist, scheme)
    return best if cap is None else min(best, cap)
