"""Accuracy techniques beyond nearest rounding and calibrated ranges, chosen by an ``--optimize`` level.

Level 0 is nearest rounding of the weights and calibrated ranges, nothing more; 1 (the default) adds the cheap
techniques; 2 adds learned rounding, and cross-layer equalization where weights are per tensor. Each technique is
a separate module and can be switched on or off by name (``QuantizeConfig.techniques``):
  equalize         cross-layer equalization of Conv -> (ReLU | identity) -> Conv chains (float-exact)
  smoothquant      SmoothQuant migration into MatMul/Gemm weights (float-exact)
  adaround         learned rounding: each weight rounded up or down for its layer's output error
  bias-correction  the mean output shift of weight quantization folded into the biases
  uneven-depthwise depthwise Convs whose input channel ranges are very uneven left float (a placement change)
"""

from __future__ import annotations

TECHNIQUES: tuple[str, ...] = ("equalize", "smoothquant", "adaround", "bias-correction", "uneven-depthwise")
LEVELS: dict[int, tuple[str, ...]] = {
    0: (),
    1: ("smoothquant", "bias-correction", "uneven-depthwise"),
    2: ("equalize", "smoothquant", "adaround", "bias-correction", "uneven-depthwise"),
}
# The techniques that rescale activations: ranges measured after them are the rescaled model's tensors'.
RESCALING: tuple[str, ...] = ("equalize", "smoothquant")
# Iterations of AdaRound's soft relaxation before the greedy flips. 0: measured on the sample models
# (benchmarks/techniques.py), 200 iterations took 5-100x longer than the flips alone and ended within 0.3 dB of
# them, as often below as above. The relaxation stays available to the Python API (adaround.learned_rounding).
RELAXATION_ITERATIONS = 0


# Cross-layer equalization evens out weight ranges across output channels, which per-channel weight scales already
# do; what it changes then is the activation between the pair, per channel, under one per-tensor scale. With
# per-channel weights level 2 leaves it out: it lost 4.3 dB on the PP-OCRv4 detector, 1.0 on the recogniser, 0.7
# on the PP-OCR classifier and 0.5 on the depthwise CNN, and gained 0.2 on the residual CNN. With per-tensor
# weights, what it was made for, it gains 0.1-0.7 dB on the small CNNs (benchmarks/techniques.py).
PER_TENSOR_WEIGHTS_ONLY = ("equalize",)


def chosen_techniques(level: int, techniques: tuple[str, ...] | None, *, per_channel: bool = True
                      ) -> tuple[str, ...]:
    """The techniques to run: ``techniques`` when given, else the level's (for per-channel weights, without
    those made for per-tensor weights)."""
    if techniques is not None:
        return techniques
    return tuple(t for t in LEVELS[level] if not (per_channel and t in PER_TENSOR_WEIGHTS_ONLY))
