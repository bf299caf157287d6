"""Accuracy techniques beyond nearest rounding and calibrated ranges, chosen by an ``--optimize`` level.

Each technique is a separate module and can be switched on or off by name (``QuantizeConfig.techniques``):
  equalize         cross-layer equalization of Conv -> (ReLU | identity) -> Conv chains (float-exact)
  smoothquant      SmoothQuant migration for MatMul/Gemm fed by LayerNormalization (float-exact)
  adaround         learned rounding: each weight rounded up or down for its layer's output error
  bias-correction  the mean output shift of weight quantization folded into the biases
"""

from __future__ import annotations

TECHNIQUES: tuple[str, ...] = ("equalize", "smoothquant", "adaround", "bias-correction")
LEVELS: dict[int, tuple[str, ...]] = {
    0: (),
    1: ("smoothquant", "adaround", "bias-correction"),
    2: ("equalize", "smoothquant", "adaround", "bias-correction"),
}
# AdaRound's relaxation iterations per level (0: the greedy flips alone, already most of the gain).
ROUNDING_ITERATIONS: dict[int, int] = {0: 0, 1: 0, 2: 300}


def chosen_techniques(level: int, techniques: tuple[str, ...] | None) -> tuple[str, ...]:
    """The techniques to run: ``techniques`` when given, else the level's."""
    return LEVELS[level] if techniques is None else techniques
