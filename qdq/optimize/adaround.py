"""Learned rounding (AdaRound-style): round each weight up or down to minimise its layer's output error.

For one output channel with weights ``w``, scale ``s`` and input second moment ``H = E[x x^T]``, the expected
squared output error of a rounding ``q`` is ``(s q - w)^T H (s q - w)``. Nearest rounding minimises each
term on its own and ignores how errors of correlated inputs add up; here every weight may take either grid
point next to it (floor or floor + 1, so never more than one step from nearest) and the choice is optimised:
  1. AdaRound's relaxation (Nagel et al., 2020): a soft choice ``h = clip(sigmoid(V)·1.2 − 0.1, 0, 1)`` per
     weight, Adam on the normalised error plus a regulariser that pushes ``h`` to 0 or 1 as its exponent
     anneals from 20 to 2; then ``h`` is thresholded at 0.5.
  2. A greedy polish: while some single flip lowers a channel's error, make the best one (bounded steps).
  3. A guard: a channel whose error is not below nearest's keeps nearest, so no layer gets worse on the
     calibration data.
The ``--optimize`` levels run 2 and 3 only (``iterations=0``): on the sample models the relaxation cost 5-100x
more time for no gain (benchmarks/techniques.py). Weights at the ends of the grid (|q| = 127, which hold the
channel's amax) keep nearest, so the scale is the one nearest rounding has. Everything is per layer in numpy;
memory is one layer's weights and Gram matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch
DAMPING = 0.01  # of H's mean diagonal, added to its diagonal: few calibration rows must not make H singular


@dataclass(frozen=True)
class Rounding:
    """The chosen integers, and the summed channel errors of nearest rounding and of the choice (damped H)."""

    q: np.ndarray
    nearest_error: float
    error: float


def channel_errors(q: np.ndarray, w: np.ndarray, scale: np.ndarray, second: np.ndarray) -> np.ndarray:
    """``(s q − w)^T H (s q − w)`` per channel: ``[groups, N]`` from ``[groups, N, K]`` and ``[groups, K, K]``."""
    d = scale[..., None] * q - w
    return ((d @ second) * d).sum(axis=-1)


def nearest(w: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(w / scale[..., None]), -127, 127)


def learned_rounding(w: np.ndarray, scale: np.ndarray, second: np.ndarray, *, iterations: int = 400,
                     regularisation: float = 0.05, learning_rate: float = 0.05, polish_steps: int = 64
                     ) -> Rounding:
    """Integer weights ``[groups, N, K]`` (each floor or floor + 1 of ``w / s``) with a low output error.

    Args:
        w: the float weights as matrices ``[groups, N, K]``.
        scale: each channel's quantization scale ``[groups, N]``.
        second: ``E[x x^T]`` of the layer's input patches per group ``[groups, K, K]``.
    """
    w = w.astype(np.float64)
    scale = scale.astype(np.float64)
    diag = np.einsum("gkk->gk", second).mean(axis=1)
    h_matrix = second + DAMPING * np.maximum(diag, 1e-30)[:, None, None] * np.eye(second.shape[-1])
    v = w / scale[..., None]
    low = np.floor(v)
    near = nearest(w, scale)
    fixed = (np.abs(near) >= 127) | (low + 1 > 127) | (low < -127)
    base = channel_errors(near, w, scale, h_matrix)
    if iterations > 0 and base.sum() > 0:
        soft = relaxed(w, scale, h_matrix, low, near, fixed, base.sum(), iterations, regularisation, learning_rate)
        q = np.where(fixed, near, low + (soft >= 0.5))
    else:
        q = near.copy()
    q = polish(q, w, scale, h_matrix, low, fixed, polish_steps)
    errors = channel_errors(q, w, scale, h_matrix)
    worse = errors >= base
    q[worse] = near[worse]
    return Rounding(q, float(base.sum()), float(np.where(worse, base, errors).sum()))


def relaxed(w: np.ndarray, scale: np.ndarray, h_matrix: np.ndarray, low: np.ndarray, near: np.ndarray,
            fixed: np.ndarray, norm: float, iterations: int, regularisation: float, learning_rate: float
            ) -> np.ndarray:
    """AdaRound's soft rounding after ``iterations`` Adam steps; returns ``h`` in [0, 1] per weight."""
    rest = np.clip(w / scale[..., None] - low, 1e-4, 1 - 1e-4)
    params = -np.log((ZETA - GAMMA) / (rest - GAMMA) - 1)  # h(params) == rest: start where the weights are
    m1, m2 = np.zeros_like(params), np.zeros_like(params)
    warmup = iterations // 5
    size = params.size
    h = rest
    for step in range(1, iterations + 1):
        sig = 1 / (1 + np.exp(-params))
        h = np.clip(sig * (ZETA - GAMMA) + GAMMA, 0, 1)
        h = np.where(fixed, near - low, h)
        d = scale[..., None] * (low + h) - w
        grad = 2 * scale[..., None] * (d @ h_matrix) / norm
        if step > warmup:
            beta = 20 + (2 - 20) * (step - warmup) / max(iterations - warmup, 1)
            u = 2 * h - 1
            grad += regularisation * (-2 * beta * np.abs(u) ** (beta - 1) * np.sign(u)) / size
        grad = grad * (ZETA - GAMMA) * sig * (1 - sig) * ((h > 0) & (h < 1))
        grad[fixed] = 0
        m1 = 0.9 * m1 + 0.1 * grad
        m2 = 0.999 * m2 + 0.001 * grad ** 2
        params -= learning_rate * (m1 / (1 - 0.9 ** step)) / (np.sqrt(m2 / (1 - 0.999 ** step)) + 1e-12)
    return h


def polish(q: np.ndarray, w: np.ndarray, scale: np.ndarray, h_matrix: np.ndarray, low: np.ndarray,
           fixed: np.ndarray, steps: int) -> np.ndarray:
    """Greedy single flips between floor and floor + 1, the best per channel per step, while one helps."""
    q = q.copy()
    s = scale[..., None]
    d = s * q - w
    hd = (d @ h_matrix)
    diag = np.einsum("gkk->gk", h_matrix)[:, None, :]
    groups, rows, _ = q.shape
    gi, ri = np.meshgrid(np.arange(groups), np.arange(rows), indexing="ij")
    for _ in range(steps):
        delta = np.where(q == low, s, -s)  # the change in s·q that a flip makes
        gain = 2 * delta * hd + delta ** 2 * diag  # the change in the channel's error
        gain[fixed] = np.inf
        best = gain.argmin(axis=-1)
        improves = np.take_along_axis(gain, best[..., None], -1)[..., 0] < -1e-12 * (1 + np.abs(hd).sum(-1))
        if not improves.any():
            break
        step = np.take_along_axis(delta, best[..., None], -1)[..., 0] * improves
        q[gi, ri, best] += np.where(improves, np.sign(step), 0)
        hd += step[..., None] * h_matrix[gi, best]
    return q
