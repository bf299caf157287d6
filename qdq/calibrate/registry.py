"""From method name to what it needs: the statistic to collect, and the pure function statistic -> amax.

Adding a method is one entry here and its function in ``methods.py`` (or its own module).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING

from qdq.calibrate.histogram import Histogram
from qdq.calibrate.methods import amax_entropy, amax_entropy_guarded, amax_mse, amax_percentile
from qdq.calibrate.stats import AbsMax

if TYPE_CHECKING:
    from qdq.calibrate.options import CalibrationOptions

Statistic = AbsMax | Histogram
DEFAULT_METHOD = "mse"


@dataclass(frozen=True)
class Method:
    """A calibration method: ``statistic`` is ``"absmax"`` or ``"histogram"``; ``amax`` reduces it."""

    statistic: str
    amax: Callable[[Statistic, CalibrationOptions], float]


def max_amax(stat: Statistic, options: CalibrationOptions) -> float:
    return stat.amax


def entropy_amax(stat: Statistic, options: CalibrationOptions) -> float:
    return amax_entropy(stat)


def entropy_guarded_amax(stat: Statistic, options: CalibrationOptions) -> float:
    return amax_entropy_guarded(stat)


def percentile_amax(stat: Statistic, options: CalibrationOptions) -> float:
    return amax_percentile(stat, options.percentile)


def mse_amax(stat: Statistic, options: CalibrationOptions) -> float:
    return amax_mse(stat, scheme=options.scheme)


METHODS: Mapping[str, Method] = MappingProxyType({
    # auto's amax comes from qdq.calibrate.auto (it needs the model and data); max stands until then.
    "auto": Method("histogram", max_amax),
    "entropy": Method("histogram", entropy_amax),
    "entropy-guarded": Method("histogram", entropy_guarded_amax),
    "max": Method("absmax", max_amax),
    "percentile": Method("histogram", percentile_amax),
    "mse": Method("histogram", mse_amax),
})


def new_statistic(options: CalibrationOptions) -> Statistic:
    """An empty statistic of the kind ``options.method`` reduces."""
    return AbsMax() if METHODS[options.method].statistic == "absmax" else Histogram(options.num_bins)


def method_amax(stat: Statistic, options: CalibrationOptions) -> float:
    return METHODS[options.method].amax(stat, options)
