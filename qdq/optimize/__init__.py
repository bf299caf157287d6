"""Accuracy techniques beyond nearest rounding and calibrated ranges, chosen by an ``--optimize`` level.

Level 0 is nearest rounding of the weights and calibrated ranges, nothing more; 1 (the default) adds the cheap
techniques and cross-layer equalization where a data pass predicts it pays; 2 adds learned rounding, kept only
where it brings the outputs closer. Each technique is a separate module and can be switched on or off by name
(``QuantizeConfig.techniques``):
  equalize         cross-layer equalization of the Conv -> (ReLU | PReLU | LeakyReLU | identity) -> Conv pairs
                   predicted to gain (float-exact), kept if the quantized outputs on calibration data get closer
  smoothquant      SmoothQuant migration into MatMul/Gemm weights (float-exact)
  adaround         learned rounding: each weight rounded up or down for its layer's output error
  bias-correction  the mean output shift of weight quantization folded into the biases
  uneven-depthwise depthwise Convs whose input channel ranges are very uneven left float (a placement change)
  dominant-layer   a layer whose quantization alone makes most of the output noise left float (a placement change)
"""

from __future__ import annotations

TECHNIQUES: tuple[str, ...] = ("equalize", "smoothquant", "adaround", "bias-correction", "uneven-depthwise",
                                "dominant-layer")
LEVELS: dict[int, tuple[str, ...]] = {
    0: (),
    1: ("equalize", "smoothquant", "bias-correction", "uneven-depthwise", "dominant-layer"),
    2: ("equalize", "smoothquant", "adaround", "bias-correction", "uneven-depthwise", "dominant-layer"),
}
# The techniques that rescale activations: ranges measured after them are the rescaled model's tensors'.
RESCALING: tuple[str, ...] = ("equalize", "smoothquant")
# Iterations of AdaRound's soft relaxation before the greedy flips. 0: measured on the sample models
# (benchmarks/techniques.py), 200 iterations took 5-100x longer than the flips alone and ended within 0.3 dB of
# them, as often below as above. The relaxation stays available to the Python API (adaround.learned_rounding).
RELAXATION_ITERATIONS = 0


def chosen_techniques(level: int, techniques: tuple[str, ...] | None) -> tuple[str, ...]:
    """The techniques to run: ``techniques`` when given, else the level's."""
    return LEVELS[level] if techniques is None else techniques
