"""Leave float the depthwise Convs whose input channels have very uneven ranges.

A depthwise Conv computes each output channel from one input channel alone, and TensorRT quantizes activations
per tensor: when a few input channels reach 30 and the rest stay below 0.1, one INT8 scale rounds the small
channels to zero and the Conv, which may scale each channel by large BN-folded weights, passes that loss on
undiluted. No choice of range helps (clip the large channels or lose the small ones), and weight-side
techniques cannot reach it. Found on PaddleOCR's PP-OCRv4 text detector and recogniser and a PicoDet layout
detector (learnable affine blocks and HardSwish before the depthwise Convs): leaving only these Convs float took
the text detector from 12.6 to 15.0 dB, the recogniser from 13.8 to 15.9 dB and the layout model from 0.7 to
15.8 dB at the defaults (benchmarks/versus.py).
The price is speed: TensorRT runs these layers in FP16 or FP32, with reformats around them.

The channel ranges are read on the first ``SAMPLES`` calibration samples (fewer: skipped, said in a note), before
calibration, so the ranges are then measured only for what stays quantized.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from qdq.calibrate.data import Dataset
from qdq.graph import GraphIndex
from qdq.optimize.channels import SAMPLES, channel_statistics
from qdq.placement.plan import QuantPlan

# Median channel max / largest channel max below which the Conv stays float (at 0.2 the median channel still
# gets 25 of INT8's 127 levels). Measured with benchmarks/versus.py: the PicoDet layout detector read 11.9 dB at
# 0.15, 14.8 at 0.20, 17.6 at 0.25 (its 37 depthwise inputs range from 0.03 to 0.43); PP-OCR's direction
# classifier, where INT8 is fine, has depthwise inputs from 0.29 on 64 samples but one at 0.247 on 8 samples, and
# leaving that one float cost 5 dB (errors that cancelled no longer do): hence the margin and the sample count.
THRESHOLD = 0.2
RULE = "uneven-depthwise"


@dataclass(frozen=True)
class Site:
    """A quantized depthwise Conv and the activation it reads."""

    node: str
    tensor: str


def depthwise_sites(model: onnx.ModelProto, plan: QuantPlan) -> list[Site]:
    """The quantized Convs with one input channel per group (group > 1, weight ``[C_out, 1, ...]``)."""
    index = GraphIndex(model)
    nodes = {n.name: n for n in model.graph.node}
    sites = []
    for decision in plan.quantized_nodes():
        node = nodes.get(decision.node)
        if node is None or node.op_type != "Conv":
            continue
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        weight = index.constants.get(node.input[1]) if len(node.input) > 1 else None
        if group > 1 and weight is not None and len(weight.dims) >= 3 and weight.dims[1] == 1:
            sites.append(Site(decision.node, node.input[0]))
    return sites


def balance(channel_max: np.ndarray) -> float:
    """Median channel max over the largest (1.0: even; near 0: a few channels dominate)."""
    finite = channel_max[np.isfinite(channel_max)]
    top = float(finite.max(initial=0.0))
    return 1.0 if top == 0.0 else float(np.median(finite)) / top


def leave_uneven_depthwise(model: onnx.ModelProto, plan: QuantPlan, data: Dataset) -> tuple[QuantPlan, list[str]]:
    """``plan`` with the depthwise Convs whose input channel ranges are uneven left float, and a note."""
    sites = depthwise_sites(model, plan)
    if not sites:
        return plan, []
    stats, samples = channel_statistics(model, sorted({s.tensor for s in sites}), data,
                                        why="reading depthwise input channels")
    if samples < SAMPLES:
        return plan, [f"uneven-depthwise skipped: {samples} calibration samples, it needs {SAMPLES} to judge the "
                      f"channel ranges of {len(sites)} depthwise Convs"]
    reasons = {}
    for site in sites:
        if site.tensor in stats and (ratio := balance(stats[site.tensor].max)) < THRESHOLD:
            reasons[site.node] = (RULE, f"depthwise Conv whose input channels are uneven (median channel max "
                                        f"{ratio:.3f} of the largest on {samples} samples, below {THRESHOLD}): "
                                        "one per-tensor INT8 scale would round its small channels to zero")
    if not reasons:
        return plan, []
    shown = ", ".join(list(reasons)[:3]) + (", ..." if len(reasons) > 3 else "")
    return plan.leaving_float(reasons), [
        f"uneven-depthwise: {len(reasons)} of {len(sites)} depthwise Convs left float ({shown}): their input "
        f"channels' ranges differ by more than 1/{THRESHOLD:.2f} between the median and the largest"]
