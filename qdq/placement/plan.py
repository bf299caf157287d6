"""The quantization plan: which tensor is quantized for which consumer, and the rule that decided."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

Kind = Literal["activation", "weight"]


@dataclass(frozen=True)
class QuantInput:
    """One quantized input edge: ``tensor`` feeding input slot ``index`` of the deciding node.

    Activations are quantized per tensor with a calibrated range. Weights are constants quantized from their
    own values, per channel along ``axis`` (``None``: one scale for the whole tensor).
    """

    tensor: str
    index: int
    kind: Kind
    axis: int | None = None


@dataclass(frozen=True)
class Decision:
    """What placement decided for one node, and why."""

    node: str
    op: str
    quantized: bool
    rule: str
    reason: str
    inputs: tuple[QuantInput, ...] = ()


Use = tuple[str, int]  # (consumer node name, input index)


@dataclass(frozen=True)
class QuantPlan:
    """Every node's decision, in graph order, and the groups of tensors that must share one scale.

    Computed before any Q/DQ node is written.
    """

    decisions: tuple[Decision, ...]
    shared_scales: tuple[tuple[str, ...], ...] = ()

    def __bool__(self) -> bool:
        return any(d.quantized for d in self.decisions)

    def activations(self) -> dict[str, list[Use]]:
        """Each activation tensor to quantize, with the consumer inputs that read it through its one Q/DQ pair."""
        uses: dict[str, list[Use]] = defaultdict(list)
        for d in self.decisions:
            for q in d.inputs:
                if q.kind == "activation":
                    uses[q.tensor].append((d.node, q.index))
        return {name: sorted(uses[name]) for name in sorted(uses)}

    def weights(self) -> dict[tuple[str, int | None], list[Use]]:
        """Each (weight, axis) to quantize, with its consumer inputs."""
        uses: dict[tuple[str, int | None], list[Use]] = defaultdict(list)
        for d in self.decisions:
            for q in d.inputs:
                if q.kind == "weight":
                    uses[(q.tensor, q.axis)].append((d.node, q.index))
        return {key: sorted(uses[key]) for key in sorted(uses, key=lambda k: (k[0], -1 if k[1] is None else k[1]))}

    def leaving_float(self, reasons: Mapping[str, tuple[str, str]]) -> QuantPlan:
        """The plan with the quantized nodes in ``reasons`` (node -> (rule, reason)) left float, and the scale
        groups narrowed to the tensors still quantized."""
        decisions = tuple(Decision(d.node, d.op, False, *reasons[d.node]) if d.quantized and d.node in reasons
                          else d for d in self.decisions)
        kept = {q.tensor for d in decisions for q in d.inputs if q.kind == "activation" and d.quantized}
        groups = tuple(g for g in (tuple(t for t in group if t in kept) for group in self.shared_scales) if len(g) > 1)
        return QuantPlan(decisions, shared_scales=groups)

    def activation_names(self) -> list[str]:
        return list(self.activations())

    def quantized_nodes(self) -> list[Decision]:
        return [d for d in self.decisions if d.quantized]

    def explain(self) -> str:
        """One line per node: quantized or float, the rule, and the reason; then the shared-scale groups."""
        width = max((len(d.node) for d in self.decisions), default=0)
        lines = []
        for d in self.decisions:
            mark = "int8 " if d.quantized else "float"
            quantized = f" <- {', '.join(q.tensor for q in d.inputs)}" if d.inputs else ""
            lines.append(f"{mark}  {d.node:<{width}}  {d.op:<18} [{d.rule}] {d.reason}{quantized}")
        for group in self.shared_scales:
            lines.append(f"shared scale: {', '.join(group)}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """The plan as plain data (``qdq explain --json``)."""
        return {
            "nodes": [{"node": d.node, "op": d.op, "quantized": d.quantized, "rule": d.rule, "reason": d.reason,
                       "inputs": [{"tensor": q.tensor, "index": q.index, "kind": q.kind, "axis": q.axis}
                                  for q in d.inputs]} for d in self.decisions],
            "shared_scales": [list(g) for g in self.shared_scales],
        }
