"""Cast the float parts of a Q/DQ model to FP16, so that strongly typed TensorRT runs them in FP16.

TensorRT 11 runs every tensor in the precision the graph gives it: the float parts of an INT8 model run in FP32
unless the graph says FP16. This pass says so, node by node:

- Ops whose FP16 results are fragile stay FP32: normalisations, Softmax, reductions, Exp/Log/Pow/Sqrt/Erf, the
  elementwise ops around them (decomposed LayerNorm, GELU) and Adds of masks (-1e4, -inf). Another tool's
  cast-everything default cost 4-13 dB SQNR and broke a sentence encoder (../shared/specs/placement.md).
- Constants FP16 cannot hold (float32's lowest value, which transformers writes into attention masks, is -inf in
  FP16) and every node carrying them on to the Softmax stay FP32: a row the mask hides completely would
  otherwise turn into NaN (seen on the corpus's BERT, T5 and left-padded GPT-2).
- A Q/DQ pair takes the precision of the layer it feeds: FP16 scales (opset 19) make its DequantizeLinear output
  FP16, so the INT8 layer writes FP16 and no Cast sits between DQ and the layer (which would stop the fusion).
- Graph inputs and outputs keep their types (Casts at the edges); float32 initializers read in FP16 are stored
  in FP16.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qdq.attention import is_mask_add
from qdq.graph import GraphIndex, default_opset, fresh_name, sort_nodes, subgraph_reads
from qdq.ops import ARITHMETIC_OPS, CONTROL_FLOW_OPS, FP16_FRAGILE_OPS, NORMALIZATION_OPS, QDQ_OPS, SOFTMAX_OPS
from qdq.passes.base import Pass, PassError, PassResult

FP32, FP16 = TensorProto.FLOAT, TensorProto.FLOAT16
# Fragile ops whose neighbours stay FP32 with them (constants are made by them, not computed near them).
FP32_CORE_OPS = FP16_FRAGILE_OPS - {"Constant", "ConstantOfShape"}
FP16_MIN_OPSET = 19  # DequantizeLinear with a float16 scale (and so a float16 output)
FP16_MAX = float(np.finfo(np.float16).max)  # 65504
MASK_CONSTANT_LIMIT = 4096  # elements: a fill value or a precomputed [64, 64] causal mask
# Ops whose output stays in a small range whatever their input: huge values stop there.
BOUNDED_OPS = SOFTMAX_OPS | NORMALIZATION_OPS | frozenset({"Sigmoid", "Tanh", "Erf", "HardSigmoid"})


class CastToFP16(Pass):
    """Run the non-quantized float parts of the graph in FP16, keeping sensitive ops in FP32 (see the module)."""

    name = "high-precision-fp16"
    in_place = True

    def requires(self, model: onnx.ModelProto) -> None:
        if default_opset(model) < FP16_MIN_OPSET:
            raise PassError(f"pass {self.name}: float16 Q/DQ scales need opset {FP16_MIN_OPSET}, the model has "
                            f"{default_opset(model)}; run UpgradeOpset({FP16_MIN_OPSET}) before it")

    def run(self, model: onnx.ModelProto) -> PassResult:
        types = tensor_types(model)
        links = GraphIndex(model)
        beyond = beyond_fp16(model, links, types)
        half = {n.name: wants_fp16(n, links, types) and not beyond.intersection(n.input) for n in model.graph.node}
        settle_qdq(model, half, links)
        kept = sum(1 for n in model.graph.node
                   if n.op_type not in QDQ_OPS and not half[n.name] and float_node(n, types))
        converted = rewrite(model, half, types)
        note = (f"float parts cast to FP16: {sum(half.values())} nodes in FP16, {kept} float nodes kept in FP32 "
                "(normalisations, Softmax, reductions, exp/log/pow and their neighbours)")
        return PassResult(converted, modified=True, notes=(note,))


def tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor, after shape inference (which rewrite needs anyway)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {}
    for info in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        if info.type.HasField("tensor_type"):
            types[info.name] = info.type.tensor_type.elem_type
    for init in model.graph.initializer:
        types[init.name] = init.data_type
    return types


def float_node(node: onnx.NodeProto, types: dict[str, int]) -> bool:
    return any(types.get(t) == FP32 for t in (*node.input, *node.output) if t)


def wants_fp16(node: onnx.NodeProto, links: GraphIndex, types: dict[str, int]) -> bool:
    if node.op_type in QDQ_OPS or node.op_type in FP16_FRAGILE_OPS or node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type in CONTROL_FLOW_OPS:
        return False  # its subgraphs stay FP32 (this pass rewrites the main graph), and so do their outputs
    if not float_node(node, types) or node.op_type == "Cast":
        return False
    if node.op_type in ARITHMETIC_OPS and near_fp32_core(node, links):
        return False
    return not (node.op_type == "Add" and is_mask_add(links, node.input, node.output[0]))


def beyond_fp16(model: onnx.ModelProto, links: GraphIndex, types: dict[str, int]) -> set[str]:
    """Float tensors that may hold finite values beyond FP16's range: such constants, then, in graph order, the
    float outputs of nodes reading them, up to an op whose output is bounded (Softmax, a normalisation)."""
    beyond = {name for name in links.constants if types.get(name) == FP32 and exceeds_fp16(links, name)}
    for node in model.graph.node:  # topological order: a tensor is marked before its readers are visited
        if node.op_type not in BOUNDED_OPS and beyond.intersection(node.input):
            beyond.update(o for o in node.output if types.get(o) == FP32)
    return beyond


def exceeds_fp16(links: GraphIndex, name: str) -> bool:
    # Masks and fill values are scalars or at most [seq, seq]; weights are not read (they are never this large).
    values = links.small_value(name, limit=MASK_CONSTANT_LIMIT)
    if values is None or values.size == 0:
        return False
    finite = np.abs(values[np.isfinite(values)])
    return finite.size > 0 and float(finite.max()) > FP16_MAX


def near_fp32_core(node: onnx.NodeProto, links: GraphIndex) -> bool:
    """An elementwise op reading from or feeding a kept-FP32 op: part of a decomposed LayerNorm or GELU."""
    return any(n.op_type in FP32_CORE_OPS for n in links.neighbours(node))


def settle_qdq(model: onnx.ModelProto, half: dict[str, bool], links: GraphIndex) -> None:
    """A DQ is FP16 when any layer it feeds is; its Q follows it. Weight DQs follow their layer too."""
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear":
            half[node.name] = any(half.get(r.name, False) for r in links.consumers(node.output[0]))
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear":
            half[node.name] = any(half[dq.name] for dq in links.consumers(node.output[0])
                                  if dq.op_type == "DequantizeLinear")


def input_slot(node: onnx.NodeProto, index: int, opset: int) -> str:
    """How input ``index`` of ``node`` is typed: ``float32`` when the op fixes it (Resize's scales), ``own-type``
    when its type parameter differs from the output's and the data input's (Resize's roi, Pow's exponent), else
    ``follows``. A comparison's inputs share one type (Equal's A and B; its output is bool): they follow."""
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, node.domain or "")
    except onnx.defs.SchemaError:
        return "follows"
    if not schema.inputs or not schema.outputs:
        return "follows"
    formal = schema.inputs[min(index, len(schema.inputs) - 1)]
    if formal.type_str == "tensor(float)":
        return "float32"
    shared = (schema.outputs[0].type_str, schema.inputs[0].type_str)
    return "follows" if formal.type_str in shared else "own-type"


def rewrite(model: onnx.ModelProto, half: dict[str, bool], types: dict[str, int]) -> onnx.ModelProto:
    """Give each float tensor its producer's precision, cast where a consumer wants the other, convert weights."""
    graph = model.graph
    taken = {t for n in graph.node for t in (*n.input, *n.output)} | {n.name for n in graph.node}
    initializers = {i.name: i for i in graph.initializer}
    produced_half = {o for n in graph.node if half[n.name] for o in n.output if types.get(o) == FP32}
    casts: dict[tuple[str, int], str] = {}
    new_nodes, new_inits = [], []

    def cast(name: str, to: int) -> str:
        if (name, to) not in casts:
            out = fresh_name(f"{name}_{'fp16' if to == FP16 else 'fp32'}", taken)
            new_nodes.append(helper.make_node("Cast", [name], [out], name=fresh_name(f"{out}_Cast", taken), to=to))
            casts[(name, to)] = out
        return casts[(name, to)]

    def half_initializer(name: str) -> str:
        if (name, FP16) not in casts:
            out = fresh_name(f"{name}_fp16", taken)
            values = numpy_helper.to_array(initializers[name]).astype(np.float16)
            new_inits.append(numpy_helper.from_array(values, out))
            casts[(name, FP16)] = out
        return casts[(name, FP16)]

    scale_slots = {"QuantizeLinear": (1,), "DequantizeLinear": (1,)}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), FP16_MIN_OPSET)
    for node in graph.node:
        node_wants = FP16 if half[node.name] else FP32
        for i, name in enumerate(node.input):
            if not name or types.get(name) not in (FP32, FP16):
                continue
            if node.op_type == "DequantizeLinear" and i == 0:
                continue  # the int8 input
            slot = "follows" if node.op_type in QDQ_OPS else input_slot(node, i, opset)
            if slot == "own-type" and name in initializers:
                continue  # e.g. Resize's roi: any float type, independent of the data; leave the constant as is
            wanted = FP32 if slot == "float32" else node_wants
            current = FP16 if name in produced_half else types[name]
            if i in scale_slots.get(node.op_type, ()) or current != wanted:
                if name in initializers and wanted == FP16:
                    node.input[i] = half_initializer(name)
                elif current != wanted:
                    node.input[i] = cast(name, wanted)
    # Graph outputs, and tensors that If branches or loop bodies read (they stay FP32), keep their float32 type:
    # an FP16 producer writes to a renamed tensor, cast back.
    kept = [o.name for o in graph.output] + sorted({name for n in graph.node for name in subgraph_reads(n)})
    for name in dict.fromkeys(kept):
        if name in produced_half:
            inner = fresh_name(f"{name}_fp16", taken)
            for node in graph.node:
                node.output[:] = [inner if o == name else o for o in node.output]
                node.input[:] = [inner if i == name else i for i in node.input]
            new_nodes.append(helper.make_node("Cast", [inner], [name], name=fresh_name(f"{name}_Cast", taken),
                                              to=FP32))
    graph.node.extend(new_nodes)
    graph.initializer.extend(new_inits)
    del graph.value_info[:]
    sort_nodes(graph)
    return onnx.shape_inference.infer_shapes(model)
