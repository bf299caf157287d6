"""Give every node a unique name: the plan, the explanation and Netron all refer to nodes by name."""

from __future__ import annotations

import onnx

from qdq.graph import fresh_name
from qdq.passes.base import Pass, PassResult


class NameNodes(Pass):
    """Name unnamed or duplicated nodes ``<OpType>_<first output>``, which does not depend on node order."""

    name = "name-nodes"
    in_place = True

    def run(self, model: onnx.ModelProto) -> PassResult:
        nodes = model.graph.node
        counts: dict[str, int] = {}
        for node in nodes:
            counts[node.name] = counts.get(node.name, 0) + 1
        taken = {name for name, count in counts.items() if name and count == 1}
        renamed = 0
        for node in nodes:
            if node.name and counts[node.name] == 1:
                continue
            node.name = fresh_name(f"{node.op_type}_{node.output[0] if node.output else 'node'}", taken)
            renamed += 1
        notes = (f"named {renamed} unnamed or duplicated nodes",) if renamed else ()
        return PassResult(model, modified=bool(renamed), notes=notes)
